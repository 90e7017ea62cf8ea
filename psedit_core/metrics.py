"""Editing metrics: PSNR, LPIPS, CLIPScore and CLIP directional similarity.

Notation: images are NCHW tensors in [0, 1]; ``E_I`` and ``E_T`` are CLIP image and text embeddings (any
dimension, not necessarily normalised), supplied by the caller so this module needs no CLIP weights.

    PSNR(a, b)   = 10 * log10(R^2 / mean((a - b)^2))                 R = data range (1 for [0, 1] images)
    CLIPScore    = max(100 * cos(E_I, E_T), 0)                        (Hessel et al. 2021, w = 100 as in the paper)
    CLIP-dir     = cos(E_I(edit) - E_I(src), E_T(edit) - E_T(src))    (Gal et al. 2022, StyleGAN-NADA)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "clip_directional_similarity",
    "clip_score",
    "lpips_distance",
    "psnr",
]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB (``inf`` for identical images)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS between images in [0, 1] (``model`` from :func:`psedit_core.lpips_loader.get_lpips`)."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    device = next(model.parameters()).device
    return model(a.float().to(device) * 2 - 1, b.float().to(device) * 2 - 1).flatten(1).mean(1).cpu()


def _embed(x, fn: Callable | None) -> torch.Tensor:
    out = fn(x) if fn is not None else x
    return torch.as_tensor(out).float()


def clip_score(
    images, texts, *, embed_image: Callable | None = None, embed_text: Callable | None = None
) -> torch.Tensor:
    """Per-pair CLIPScore ``max(100 * cos(E_I, E_T), 0)``.

    ``images`` / ``texts`` are embeddings ``[N, D]``, or inputs that ``embed_image`` / ``embed_text`` map to them.
    """
    e_i, e_t = _embed(images, embed_image), _embed(texts, embed_text)
    return (100 * F.cosine_similarity(e_i, e_t, dim=-1)).clamp_min(0)


def clip_directional_similarity(
    src_images,
    edit_images,
    src_texts: Sequence[str] | torch.Tensor,
    edit_texts: Sequence[str] | torch.Tensor,
    *,
    embed_image: Callable | None = None,
    embed_text: Callable | None = None,
) -> torch.Tensor:
    """Per-pair ``cos(E_I(edit) - E_I(src), E_T(edit) - E_T(src))``; inputs as in :func:`clip_score`."""
    d_img = _embed(edit_images, embed_image) - _embed(src_images, embed_image)
    d_txt = _embed(edit_texts, embed_text) - _embed(src_texts, embed_text)
    return F.cosine_similarity(d_img, d_txt, dim=-1)
