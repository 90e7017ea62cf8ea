"""Attention and feature control on an inverted photo: what Prompt-to-Prompt (:mod:`psedit_core.p2p`) and
Plug-and-Play (:mod:`psedit_core.pnp`) share, as pure tensor functions.

Both keep a photo's layout while its caption changes by handing the *edit* branch what the *source* branch computed
at the same step. Here the source branch is the inversion trajectory: at noise level ``sigma`` the source pass
evaluates the model on the trajectory's latent ``x*(sigma)`` (under an exact inversion, or null-text inversion, the
branch that reconstructs the photo). Notation (code name -> symbol), one attention layer with ``H`` heads of width
``d``:

    q, k, v      Q [B, N, H d], K, V [B, T, H d]   queries of the N image tokens; keys / values of T text tokens
                                                   (cross-attention) or of the N image tokens (self-attention)
    probs        A = softmax(Q K^T / sqrt(d))      per head, [B, H, N, T]                                  (A1)
    out          O = A V                           [B, N, H d], the layer's output before ``to_out``       (A2)

Self-attention replacement (P2P) and query/key injection (PnP) are the same rule, kept as the source's queries and
keys rather than its N x N maps:

    O_edt = softmax(Q_src K_src^T / sqrt(d)) V_edt = A_src V_edt                                            (S)

Windows are fractions of the ``n`` steps sampled, counted as the reference code counts them (``int``, not rounding):
Prompt-to-Prompt's cross-attention window on ``n + 1`` rows, its self-attention window, its local blend's start and
both Plug-and-Play windows on ``n``; ``start == end`` holds no step.

The trajectory between two of its levels is the DDIM / Euler step's linear path. On the piece
``sigma_{i+1} <= sigma <= sigma_i``:

    x*(sigma) = x_i + (sigma - sigma_i) eps*,   eps* = (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i),
    D*(sigma) = x*(sigma) - sigma eps*                                                                        (T)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "blend_start_step",
    "cross_steps",
    "truncated_steps",
    "attention_output",
    "attention_probs",
    "replace_chunks",
    "source_attention_output",
    "trajectory_point",
]


# --- windows (counted as the reference code counts them) ----------------------------------------------------------

def _check_window(start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise ValueError(f"window start={start:g}, end={end:g} is invalid: use 0 <= start <= end <= 1 "
                         "(fractions of the steps; start = end switches the control off)")


def cross_steps(start: float, end: float, n_steps: int) -> range:
    """The steps of a cross-attention window, counted as the reference counts them (``update_alpha_time_word`` on
    ``n + 1`` rows): ``int(start (n + 1)) <= t < int(end (n + 1))``, within the ``n`` steps sampled."""
    _check_window(start, end)
    rows = n_steps + 1
    return range(min(int(start * rows), n_steps), min(int(end * rows), n_steps))


def truncated_steps(start: float, end: float, n_steps: int) -> range:
    """The steps of a self-attention window (P2P) or of either Plug-and-Play window: ``int(start n) <= t <
    int(end n)``."""
    _check_window(start, end)
    return range(int(start * n_steps), int(end * n_steps))


def blend_start_step(start: float, n_steps: int) -> int:
    """The first step after which the local blend acts (``int(start_blend n)``; the reference's counter is past it
    from step index ``int(start_blend n)`` on)."""
    _check_window(start, 1.0)
    return int(start * n_steps)


# --- one attention layer ------------------------------------------------------------------------------------------

def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H d] -> [B, H, L, d]``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. (A1), ``softmax(Q K^T / sqrt(d))`` per head, computed in float32: ``[B, H, N, T]``."""
    qh, kh = _heads(q.float(), heads), _heads(k.float(), heads)
    scale = qh.shape[-1] ** -0.5
    return (qh @ kh.transpose(-1, -2) * scale).softmax(dim=-1)


def attention_output(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. (A2), ``O = A V`` back in the layer's layout ``[B, N, H d]`` and ``v``'s dtype."""
    vh = _heads(v, heads)
    out = probs.to(vh.dtype) @ vh
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def source_attention_output(q_src: torch.Tensor, k_src: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. (S): the edit's values read through the source's self-attention maps (P2P's self-attention replacement,
    PnP's query/key injection). ``q_src``/``k_src`` have one row per image; ``v`` may hold several branches of the
    same images (``[C B, N, H d]``), each reads the same maps."""
    b = q_src.shape[0]
    reps = v.shape[0] // b
    probs = attention_probs(q_src, k_src, heads)
    return attention_output(probs.repeat(reps, 1, 1, 1), v, heads)


def trajectory_point(latents: Sequence[torch.Tensor], sigmas: torch.Tensor, sigma: float,
                     rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (T): the trajectory's latent ``x*(sigma)`` and the x0 ``D*(sigma)`` its piece implies, for a ``sigma``
    between the trajectory's last and first levels (``latents[i]`` at ``sigmas[i]``, descending). At a level of the
    schedule the latent is the trajectory's own; between two levels it is the DDIM / Euler step's linear path."""
    values = [float(s) for s in sigmas.reshape(-1)]
    n = len(values) - 1
    if n < 1 or len(latents) != n + 1:
        raise ValueError(f"a trajectory needs one latent per sigma ({len(values)} sigmas, {len(latents)} latents)")
    def close(a: float, b: float) -> bool:
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12

    piece = next((i for i in range(n) if close(sigma, values[i]) or values[i + 1] < sigma < values[i]), None)
    if piece is None:
        if close(sigma, values[n]):
            last = latents[n].float()
            return last, last
        raise ValueError(
            f"sigma {sigma:.4g} lies outside the inversion's range {values[-1]:.4g}..{values[0]:.4g}: sample with the "
            "SIGMAS the photo was inverted with"
        )
    x_i, x_j = latents[piece].float(), latents[piece + 1].float()
    hi, lo = values[piece], values[piece + 1]
    if hi == lo:
        return x_i, x_i
    eps = (x_j - x_i) / (lo - hi)
    x = x_i + (sigma - hi) * eps
    return x, x - sigma * eps


def replace_chunks(t: torch.Tensor, source: torch.Tensor, chunks: Sequence[bool]) -> torch.Tensor:
    """``t`` (``[C B, ...]``: C branches of the same B images) with every branch flagged in ``chunks`` replaced by
    ``source`` (``[B, ...]``); a new tensor, ``t`` is not modified."""
    c = len(chunks)
    if c == 0 or t.shape[0] % c:
        raise ValueError(f"{t.shape[0]} rows do not split into {c} branches")
    b = t.shape[0] // c
    if source.shape[0] != b or source.shape[1:] != t.shape[1:]:
        raise ValueError(f"source features {tuple(source.shape)} do not match a branch of {tuple(t.shape)}")
    src = source.to(t)
    return torch.cat([src if flag else t[i * b:(i + 1) * b] for i, flag in enumerate(chunks)], dim=0)
