"""Edit-region masks and masked perceptual losses (localised perceptual guidance).

The paper's stated limitation: whole-image LPIPS guidance fights large edits. Comparing only the region the edit
should leave alone lifts it. Notation:

    D_edit, D_src    denoised predictions with the edit and the source caption, at the same noisy latent
    m                edit mask in [0, 1], 1 = where the edit acts (ComfyUI MASK convention: 1 = selected)
    keep = 1 - m     where the image should stay like the source

Mask estimate (DiffEdit, Couairon et al. 2022, on denoised rather than eps predictions):

    a     = mean over the probed steps t and channels c of |D_edit(x_t) - D_src(x_t)|                  (accumulate)
    a_s   = G_r * a                          Gaussian blur of radius r latent pixels                   (smooth)
    a_n   = (a_s - min a_s) / (max a_s - min a_s)   per sample                                          (normalise)
    m     = 1[a_n >= tau]                    or the soft a_n when no threshold is wanted                (threshold)

Masked loss: LPIPS's spatial map (and optionally a pixel term) averaged with weights ``keep``:

    L(image) = sum(keep * LPIPS_map(image, src)) / sum(keep) + lambda * sum(keep * (image - src)^2) / sum(keep)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_difference",
    "edit_mask",
    "fit_mask",
    "gaussian_blur",
    "masked_perceptual_loss",
    "normalise",
    "resize_mask",
]


def accumulate_difference(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over (edit, source) prediction pairs and channels of ``|edit - source|``: ``[B, 1, h, w]``."""
    total, n = None, 0
    for edit, source in pairs:
        d = (edit.float() - source.float()).abs().mean(1, keepdim=True)
        total = d if total is None else total + d
        n += 1
    if n == 0:
        raise ValueError("no prediction pairs to accumulate: probe at least one step")
    return total / n


def gaussian_blur(a: torch.Tensor, radius: float) -> torch.Tensor:
    """Separable Gaussian blur (sigma = ``radius``) of ``[B, 1, h, w]`` maps, reflect-padded; ``radius<=0``: as is."""
    if radius <= 0:
        return a
    half = max(1, int(3 * radius))
    x = torch.arange(-half, half + 1, dtype=a.dtype, device=a.device)
    k = torch.exp(-0.5 * (x / radius) ** 2)
    k = k / k.sum()
    pad_h, pad_w = min(half, a.shape[-2] - 1), min(half, a.shape[-1] - 1)
    # A map smaller than the kernel gets a truncated kernel, renormalised so constants stay constant.
    kh = k[half - pad_h: half + pad_h + 1]
    kw = k[half - pad_w: half + pad_w + 1]
    out = F.conv2d(F.pad(a, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else a, (kh / kh.sum()).reshape(1, 1, -1, 1))
    out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else out,
                   (kw / kw.sum()).reshape(1, 1, 1, -1))
    return out


def normalise(a: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1]; a constant map becomes all zeros (no edit region found)."""
    flat = a.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).reshape(-1, *([1] * (a.ndim - 1)))
    return torch.where(span > 1e-12, (a - lo.reshape_as(span)) / span.clamp_min(1e-12), torch.zeros_like(a))


def edit_mask(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, blur: float = 1.0, threshold: float | None = 0.5
) -> torch.Tensor:
    """DiffEdit-style mask ``[B, 1, h, w]`` in [0, 1] (module docstring); ``threshold=None`` keeps it soft."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (or None for a soft mask), got {threshold}")
    a = normalise(gaussian_blur(accumulate_difference(pairs), blur))
    return a if threshold is None else (a >= threshold).to(a.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """A mask ``[B, H, W]`` or ``[B, 1, H, W]`` resized to ``[B, 1, *size]``, clamped to [0, 1].

    ``mode="nearest"`` keeps a hard (0/1) mask hard.
    """
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return m.clamp(0, 1)


def fit_mask(mask: torch.Tensor, size: tuple[int, int], ratio: int = 8) -> torch.Tensor:
    """A user's mask ``[B, H, W]`` / ``[B, 1, H, W]`` brought to the image size ``size`` (the latent's size times
    the VAE's ``ratio``) the way its photo was brought there; ``[B, 1, *size]`` in [0, 1].

    - A side of ``size`` + 0..ratio-1 pixels (a mask painted on the photo itself) is centre-cropped exactly as
      ComfyUI's VAE encode crops the photo: ``(H mod ratio) // 2`` rows off the top, the rest off the bottom.
    - A mask of the same aspect ratio at another size (up to the rounding of the photo's sides to multiples of
      ``ratio``) is resized: area-averaged when shrinking (antialiased, so a thin stroke keeps its weight wherever
      it lies), bilinear when growing.
    - Any other shape raises: the photo was cropped or padded and the mask cannot know how.
    """
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"a mask must be [batch, height, width], got {tuple(mask.shape)}")
    for d, want in ((2, size[0]), (3, size[1])):
        have = m.shape[d]
        if have != want and (have // ratio) * ratio == want:
            m = m.narrow(d, (have % ratio) // 2, want)
    h, w = m.shape[-2:]
    if (h, w) != tuple(size):
        slack = ratio / min(size) + 1e-3  # the photo's sides were rounded down to multiples of ratio
        if abs((h / w) / (size[0] / size[1]) - 1) > slack:
            raise ValueError(
                f"the mask is {w}x{h} but the image it must cover is {size[1]}x{size[0]} (another aspect ratio): "
                "scale and crop the mask with the same nodes and settings as the photo (e.g. convert it to an image, "
                "apply the photo's ImageScale/crop, convert back), or paint it on the photo you encode"
            )
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return m.clamp(0, 1)


def masked_perceptual_loss(
    model: torch.nn.Module | None,
    source: torch.Tensor,
    edit_region: torch.Tensor,
    *,
    pixel_weight: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample loss pulling only the region *outside* the edit (``edit_region`` = 1 inside) to ``source``.

    ``model`` is a spatial LPIPS (``get_lpips(..., spatial=True)``) or ``None`` for the pixel term alone; images
    NCHW in [0, 1]; ``edit_region`` is resized to the image.
    """
    if model is None and pixel_weight <= 0:
        raise ValueError("a masked loss needs LPIPS, a pixel term (pixel_weight > 0), or both")
    with torch.inference_mode(False):
        src = source.detach().float().clone()
        keep = 1.0 - resize_mask(edit_region.detach().clone(), tuple(src.shape[-2:]))

    def loss(image: torch.Tensor) -> torch.Tensor:
        img = image.float()
        s = src.to(img.device).expand(img.shape[0], -1, -1, -1) if src.shape[0] == 1 else src.to(img.device)
        k = keep.to(img.device).expand(img.shape[0], -1, -1, -1) if keep.shape[0] == 1 else keep.to(img.device)
        denom = k.flatten(1).sum(1).clamp_min(1e-6)
        total = torch.zeros(img.shape[0], device=img.device)
        if model is not None:
            d = model(img * 2 - 1, s * 2 - 1)
            kd = F.interpolate(k, size=d.shape[-2:], mode="bilinear") if d.shape[-2:] != k.shape[-2:] else k
            total = total + (d * kd).flatten(1).sum(1) / kd.flatten(1).sum(1).clamp_min(1e-6)
        if pixel_weight > 0:
            total = total + pixel_weight * ((img - s).pow(2).mean(1, keepdim=True) * k).flatten(1).sum(1) / denom
        return total

    return loss
