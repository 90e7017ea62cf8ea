"""Attention and feature control on an inverted photo: Prompt-to-Prompt and Plug-and-Play as pure tensor rules.

Prompt-to-Prompt (Hertz et al. 2022) and Plug-and-Play (Tumanyan et al. 2023) keep a photo's layout while its
caption changes by handing the *edit* branch what the *source* branch computed at the same step. Here the source
branch is the inversion trajectory: at noise level ``sigma`` the source pass evaluates the model on the trajectory's
latent ``x*(sigma)`` with the source caption (under null-text inversion the branch that reconstructs the photo).

Notation (code name -> symbol), one attention layer with ``H`` heads of width ``d``:

    q, k, v      Q [B, N, H d], K, V [B, T, H d]   queries of the N image tokens; keys / values of T text tokens
                                                   (cross-attention) or of the N image tokens (self-attention)
    probs        A = softmax(Q K^T / sqrt(d))      per head, [B, H, N, T]                                  (A1)
    out          O = A V                           [B, N, H d], the layer's output before ``to_out``       (A2)
    a_src        A_src                             the source pass's A at this layer and step
    a_edit       A_edt                             the edit branch's own A
    mapper       M [T, T]                          replace: ``M[i, j]`` = share of source token i in edit token j
    index, alpha m [T], alpha [T]                  refine: edit token j comes from source token m_j where
                                                   alpha_j = 1; alpha_j = 0 marks a token new in the edit
    weights      w [T]                             reweight: the equalizer (1 except at the chosen words)

Cross-attention rules (the edit branch's maps, inside the cross-attention window; outside it ``A_edt``):

    replace      A'[..., j] = sum_i A_src[..., i] M[i, j]               (word swap, P2P ``AttentionReplace``)  (R)
    refine       A'[..., j] = alpha_j A_src[..., m_j] + (1 - alpha_j) A_edt[..., j]    (P2P ``AttentionRefine``)  (F)
    reweight     A'[..., j] = w_j F[..., j]                  (P2P ``AttentionReweight`` after a refine alignment)  (W)
    output       O_edt = A' V_edt                                                                             (A2')

``M`` pairs the words of two captions with equal word counts in order: equal words and swapped words with equal
token counts map token to token; a swapped word of ``n_s`` source and ``n_e`` edit tokens spreads each source
token's map over the edit tokens (``M = 1 / n_e`` on that block, P2P's rule); the end and padding tokens follow,
shifted by the difference in length. ``(m, alpha)`` is P2P's global (Needleman-Wunsch) alignment of the two token
sequences, start and end tokens included, with gap 0, match 1, mismatch -1; padding maps to itself.

Self-attention replacement (P2P, inside the self-attention window, at the small resolutions only) and Plug-and-Play's
self-attention injection are the same rule, kept as the source's queries and keys rather than its N x N maps:

    O_edt = softmax(Q_src K_src^T / sqrt(d)) V_edt = A_src V_edt                                            (S)

Plug-and-Play's feature injection replaces a decoder block's input features (``h`` and the skip ``h_skip``) by the
source's, so the block's residual output is the source's (``f_edt := f_src``, PnP's ``up_blocks[1].resnets[1]``).

Local blend (P2P ``LocalBlend``): the edit region from the cross-attention maps of chosen words, at the small
resolution (a quarter of the latent's side, no coarser than 8x8), summed over their tokens (``a`` = 1 on them),
averaged over heads, layers and steps:

    map  = mean_{layers, heads, steps} sum_t a_t A[..., t]                       [B, h, w]
    mask = [ up( maxpool_3x3(map) ) / max > threshold ]                          [B, 1, H, W], H x W the latent   (L)

the union of the source words' region (source pass) and the edit words' region (edit caption). Outside the mask the
prediction is taken from the source branch: for the inversion trajectory that is the x0 the trajectory itself implies.
On the trajectory's piece ``sigma_{i+1} <= sigma <= sigma_i`` (one DDIM / Euler step):

    x*(sigma) = x_i + (sigma - sigma_i) eps*,   eps* = (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i),
    D*(sigma) = x*(sigma) - sigma eps*                                                                        (T)
    D'        = D* + mask (D - D*)                                                                             (L2)

so an Euler step from a latent that agrees with the trajectory outside the mask lands on the trajectory's next latent
there. P2P blends the latents after each step (``x_t = x_src + mask (x_t - x_src)``); blending the x0 prediction
instead works for every sampler, and where the latent has drifted off the trajectory the gap shrinks by
``sigma_{i+1} / sigma_i`` per step and is gone at sigma 0.

Windows are fractions of the steps, as PSEdit's Step Window: steps ``round(start n) <= i < round(end n)``; here
``start == end`` is allowed and means no step (no control).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MODES",
    "Alignment",
    "attention_output",
    "attention_probs",
    "blend_map",
    "blend_prediction",
    "blend_resolution",
    "edit_cross_attention",
    "equalizer",
    "global_align",
    "local_blend_mask",
    "refine_alignment",
    "replace_chunks",
    "replace_mapper",
    "self_replace_layer",
    "source_attention_output",
    "trajectory_point",
    "window_steps",
    "word_positions",
]

MODES = ("replace", "refine", "reweight")
SELF_REPLACE_FRACTION = 1 / 16  # P2P replaces self-attention at 16x16 and below on a 64x64 latent: N <= N_latent / 16
BLEND_FRACTION = 1 / 16  # P2P's local blend reads the 16x16 maps of a 64x64 latent
BLEND_MIN_TOKENS = 64  # ... and none coarser than 8x8 while a finer one exists


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


# --- token alignment -------------------------------------------------------------------------------------------------

def word_positions(words: Sequence[Sequence[Hashable]], first: int = 1) -> list[range]:
    """The token positions of each word of a caption whose tokens start at ``first`` (after the start token)."""
    out, p = [], first
    for w in words:
        out.append(range(p, p + len(w)))
        p += len(w)
    return out


def replace_mapper(source_words: Sequence[Sequence[Hashable]], edit_words: Sequence[Sequence[Hashable]],
                   length: int, first: int = 1) -> torch.Tensor:
    """``M`` of eq. (R) for a word swap: ``[length, length]``, ``M[i, j]`` the share of source token i in edit token j.

    ``source_words``/``edit_words`` hold each word's tokens (as the caption tokenises them); tokens before ``first``
    (the start token) and after the words (end token, padding) map one to one, shifted by the difference in length.
    Raises ``ValueError`` when the word counts differ (a swap needs a word for every word).
    """
    if len(source_words) != len(edit_words):
        raise ValueError(
            f"replace swaps words one for one, but the source caption has {len(source_words)} words and the edit "
            f"caption {len(edit_words)}: use mode 'refine' for added or removed words, or give both captions the "
            "same number of words"
        )
    m = torch.zeros(length, length)
    for p in range(min(first, length)):
        m[p, p] = 1.0
    i = j = first
    for s, e in zip(source_words, edit_words, strict=True):
        if len(s) == len(e):
            for a in range(len(s)):
                if i + a < length and j + a < length:
                    m[i + a, j + a] = 1.0
        else:
            for a in range(len(s)):
                for b in range(len(e)):
                    if i + a < length and j + b < length:
                        m[i + a, j + b] = 1.0 / len(e)
        i, j = i + len(s), j + len(e)
    while i < length and j < length:
        m[i, j] = 1.0
        i, j = i + 1, j + 1
    return m


def global_align(x: Sequence[Hashable], y: Sequence[Hashable], gap: int = 0, match: int = 1,
                 mismatch: int = -1) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x`` (P2P's ``seq_aligner`` scores and tie order: a gap in ``x``,
    then a gap in ``y``, then the diagonal): for every ``y[j]`` the aligned index in ``x``, or -1 when ``y[j]`` is
    new (inserted)."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * gap, 1
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * gap, 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else (2 if best == up else 3)
    out = [-1] * ny
    i, j = nx, ny
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif t == 1:
            j -= 1
            out[j] = -1
        else:
            i -= 1
    return out


def refine_alignment(source_tokens: Sequence[Hashable], edit_tokens: Sequence[Hashable],
                     length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, alpha)`` of eq. (F): the tokens of both captions, start and end tokens included (no padding), aligned
    globally; edit tokens beyond the caption (padding) map to the same position with ``alpha = 1``."""
    if len(source_tokens) > length or len(edit_tokens) > length:
        raise ValueError(f"a caption has more than {length} tokens: shorten it")
    aligned = global_align(source_tokens, edit_tokens)
    index = torch.arange(length)
    alpha = torch.ones(length)
    for j, i in enumerate(aligned):
        index[j] = max(i, 0)
        alpha[j] = 1.0 if i >= 0 else 0.0
    return index, alpha


def equalizer(length: int, positions: Sequence[int], scale: float) -> torch.Tensor:
    """``w`` of eq. (W): 1 everywhere, ``scale`` at ``positions`` (the chosen words' tokens in the edit caption)."""
    w = torch.ones(length)
    if positions:
        w[list(positions)] = float(scale)
    return w


@dataclass(frozen=True)
class Alignment:
    """How the edit caption's tokens read the source maps: ``mode`` replace (``mapper``), refine (``index``,
    ``alpha``) or reweight (refine, then ``weights``)."""

    mode: str
    length: int
    mapper: torch.Tensor | None = None
    index: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "replace" and self.mapper is None:
            raise ValueError("replace needs a mapper (replace_mapper)")
        if self.mode in ("refine", "reweight") and (self.index is None or self.alpha is None):
            raise ValueError(f"{self.mode} needs an index and alpha (refine_alignment)")

    @classmethod
    def identity(cls, length: int) -> Alignment:
        """Source maps as they are (a branch that carries the source caption)."""
        return cls("refine", length, index=torch.arange(length), alpha=torch.ones(length))


def edit_cross_attention(a_src: torch.Tensor, a_edit: torch.Tensor | None, alignment: Alignment) -> torch.Tensor:
    """The edit branch's cross-attention maps, eq. (R), (F) or (W), ``[B, H, N, T]`` (float32).

    ``a_src`` are the source pass's maps for the same images; ``a_edit`` the edit branch's own (unused by replace).
    """
    a_src = a_src.float()
    if a_src.shape[-1] != alignment.length:
        raise ValueError(f"the source maps have {a_src.shape[-1]} tokens but the alignment {alignment.length}")
    if alignment.mode == "replace":
        return a_src @ alignment.mapper.to(a_src)
    index = alignment.index.to(a_src.device)
    alpha = alignment.alpha.to(a_src)
    out = a_src.index_select(-1, index) * alpha
    if a_edit is not None and bool((alpha < 1).any()):
        out = out + a_edit.float() * (1 - alpha)
    if alignment.mode == "reweight":
        out = out * alignment.weights.to(a_src)
    return out


# --- which layers and steps ----------------------------------------------------------------------------------------

def window_steps(start: float, end: float, n_steps: int) -> range:
    """Steps ``round(start n) <= i < round(end n)`` of an ``n_steps`` schedule; ``start == end`` holds none."""
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise ValueError(f"window start={start:g}, end={end:g} is invalid: use 0 <= start <= end <= 1 "
                         "(fractions of the steps; start = end switches the control off)")
    return range(round(start * n_steps), round(end * n_steps))


def self_replace_layer(n_tokens: int, latent_tokens: int, fraction: float = SELF_REPLACE_FRACTION) -> bool:
    """Whether P2P replaces self-attention at a layer of ``n_tokens`` image tokens: at a quarter of the latent's side
    and below (16x16 and 8x8 on SD1.5's 64x64 latent, P2P's ``<= 16 ** 2``; 32x32 on SDXL's 128x128)."""
    return n_tokens <= latent_tokens * fraction


def blend_resolution(available: Sequence[int], latent_tokens: int, fraction: float = BLEND_FRACTION,
                     min_tokens: int = BLEND_MIN_TOKENS) -> int:
    """Of the token counts ``available`` (one per recorded resolution), the one nearest (in log scale, the larger on a
    tie) to ``latent_tokens * fraction``: the 16x16 maps of a 64x64 latent, as P2P's local blend (32x32 on SDXL's
    128x128). Maps coarser than ``min_tokens`` (8x8) are passed over while a finer one exists: on small latents
    a quarter of the side leaves a few cells that a 3x3 pooling covers entirely."""
    if not available:
        raise ValueError("no cross-attention maps were recorded for the local blend")
    target = latent_tokens * fraction
    fine = [n for n in set(available) if n >= min_tokens] or list(set(available))
    return min(sorted(fine, reverse=True), key=lambda n: abs(math.log(n / target)))


# --- local blend -----------------------------------------------------------------------------------------------------

def blend_map(probs: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """``sum_t a_t A[..., t]`` averaged over heads: ``[B, H, N, T] -> [B, N]`` (float32)."""
    return (probs.float() * token_weights.to(probs.device, torch.float32)).sum(-1).mean(1)


def local_blend_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float = 0.3, pool: int = 1) -> torch.Tensor:
    """Eq. (L): ``maps`` ``[B, h, w]`` (already averaged over layers, heads and steps) -> a {0, 1} mask
    ``[B, 1, H, W]`` at ``size``: 3x3 max-pool (``pool`` = 1), nearest upsampling, division by each image's maximum,
    ``> threshold``. A map that is zero everywhere gives an empty mask."""
    m = maps.float()[:, None]
    if pool > 0:
        m = F.max_pool2d(m, 2 * pool + 1, stride=1, padding=pool)
    m = F.interpolate(m, size=tuple(size), mode="nearest")
    peak = m.amax(dim=(2, 3), keepdim=True)
    m = torch.where(peak > 0, m / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(m))
    return (m > threshold).float()


def blend_prediction(denoised: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (L2): ``reference + mask (denoised - reference)``; the edit inside the mask, the reference outside."""
    ref = reference.to(denoised)
    return torch.lerp(ref, denoised, mask.to(denoised).expand_as(denoised))  # exact at mask 0 and 1


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
