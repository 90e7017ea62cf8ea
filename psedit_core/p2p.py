"""Prompt-to-Prompt (Hertz et al. 2022) as pure tensor rules, as its reference code (google/prompt-to-prompt:
``ptp_utils.py``, ``seq_aligner.py`` and the null-text notebook's controllers) computes them.

The edit branch's cross-attention maps are taken from the source branch's at the same step (the source branch is
the inversion trajectory here, see :mod:`psedit_core.attention`). Notation (code name -> symbol), one cross-attention
layer, ``T`` text tokens:

    a_src, a_edit   A_src, A_edt [B, H, N, T]     the source pass's maps and the edit branch's own
    mapper          M [T, T]                      replace: share of source token i in edit token j
    index, alpha    m [T], alpha [T]              refine: edit token j reads source token m_j where alpha_j = 1
    weights         w [T]                         reweight: the equalizer (1 but at the chosen words)
    words_alpha     c_t [T]                       1 where edit token j is inside its cross-attention window at step t

Rules (``AttentionReplace``, ``AttentionRefine``, ``AttentionReweight`` and ``AttentionControlEdit.forward``):

    replace     R = A_src M                                                                        (R)
    refine      F_j = alpha_j A_src[m_j] + (1 - alpha_j) A_edt[j]                                  (F)
    reweight    W = w * (R or F)   (a reweight rides on a replace or a refine, or on the identity) (W)
    window      A' = c_t * (R, F or W) + (1 - c_t) * A_edt                                         (C)

Windows count steps as the reference does: cross-attention ``int(start (n + 1)) <= t < int(end (n + 1))`` per token
(``get_time_words_attention_alpha``: the default window, then any per-word windows on the edit caption's tokens),
self-attention ``int(start n) <= t < int(end n)``.

Local blend (``LocalBlend`` of the null-text notebook): after every step from ``int(start_blend n)`` on, the edit
branch's latent is taken from the source branch outside a mask recomputed from the maps stored so far, the sum over
the steps ``s <= t`` of every cross-attention layer of the reference's 16x16 size (or, on a model without one, the
nearest; the middle block excluded), for the source branch and the edit branch (the edit's maps as the rules above
left them):

    map_b  = mean_{layers, heads} sum_{s <= t} sum_j a_bj A_b[..., j]       a_b: 1 on the blend words of branch b
    mask_b = [ up_nearest( maxpool_3x3(map_b) ) / max > threshold ]
    mask   = mask_src OR mask_edit                                                                 (L)
    x_edt  = x_src + mask (x_edt - x_src)                                                          (L2)

Where PSEdit departs from the reference by choice it says so: ``tail="shifted"`` maps the tokens after a swap of
words with different token counts to the aligned tokens (the reference maps them position by position).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import cross_steps

MODES = ("replace", "refine", "reweight")
TAILS = ("reference", "shifted")
SELF_REPLACE_FRACTION = 1 / 16  # self-attention replaced at 16x16 and below on a 64x64 latent: N <= N_latent / 16
BLEND_TOKENS = 16 * 16  # the local blend reads the reference's 16x16 maps (or the nearest size a model has)
BLEND_POOL = 1  # max-pool half-width: 3x3


# --- windows ---------------------------------------------------------------------------------------------------------

def words_alpha(n_steps: int, length: int, default: tuple[float, float],
                words: Sequence[tuple[Sequence[int], tuple[float, float]]] = ()) -> torch.Tensor:
    """``c`` of eq. (C), ``[n_steps, length]``: 1 where a token's cross-attention window holds at a step; every token
    has the ``default`` window, then each ``(positions, window)`` of ``words`` sets its own (edit-caption tokens)."""
    alpha = torch.zeros(n_steps, length)
    for positions, (start, end) in [(range(length), default), *words]:
        cols = torch.as_tensor(list(positions), dtype=torch.long)
        if cols.numel() == 0:
            continue
        alpha[:, cols] = 0.0
        steps = cross_steps(start, end, n_steps)
        if len(steps):
            alpha[steps.start:steps.stop, cols] = 1.0
    return alpha


# --- token alignment -------------------------------------------------------------------------------------------------

def word_positions(words: Sequence[Sequence[Hashable]], first: int = 1) -> list[range]:
    """The token positions of each word of a caption whose tokens start at ``first`` (after the start token)."""
    out, p = [], first
    for w in words:
        out.append(range(p, p + len(w)))
        p += len(w)
    return out


def replace_mapper(source_words: Sequence[Sequence[Hashable]], edit_words: Sequence[Sequence[Hashable]],
                   length: int, first: int = 1, tail: str = "reference") -> torch.Tensor:
    """``M`` of eq. (R) for a word swap: ``[length, length]``, ``M[i, j]`` the share of source token i in edit token j.

    Words pair up in order; a swapped word of ``n_s`` source and ``n_e`` edit tokens spreads each source token over
    the edit tokens (``1 / n_e``, the reference's ``get_replacement_mapper_``), equal words map token to token. Up to
    the last word that differs both captions' positions advance word by word; after it the reference maps every
    remaining edit token to the source token at the same position (``tail="reference"``): where the swapped words'
    token counts differ, the edit's later words, end token and padding then read the source's tokens one place off.
    ``tail="shifted"`` (PSEdit's) keeps pairing them with the aligned source tokens. Raises ``ValueError`` when the
    word counts differ (a swap needs a word for every word).
    """
    if len(source_words) != len(edit_words):
        raise ValueError(
            f"replace swaps words one for one, but the source caption has {len(source_words)} words and the edit "
            f"caption {len(edit_words)}: use mode 'refine' for added or removed words, or give both captions the "
            "same number of words"
        )
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    swapped = [k for k, (s, e) in enumerate(zip(source_words, edit_words, strict=True)) if tuple(s) != tuple(e)]
    last = swapped[-1] if swapped else -1
    m = torch.zeros(length, length)
    for p in range(min(first, length)):
        m[p, p] = 1.0
    i = j = first
    for k, (s, e) in enumerate(zip(source_words, edit_words, strict=True)):
        if tail == "reference" and k > last:
            break
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
    if tail == "reference":
        for p in range(j, j + max(0, min(length - i, length - j))):  # its ``mapper[j, j] = 1`` once no swap is left,
            m[p, p] = 1.0  # while both positions are within the window
        return m
    while i < length and j < length:
        m[i, j] = 1.0
        i, j = i + 1, j + 1
    return m


def global_align(x: Sequence[Hashable], y: Sequence[Hashable], gap: int = 0, match: int = 1,
                 mismatch: int = -1) -> list[int]:
    """Needleman-Wunsch alignment of ``y`` to ``x`` (the reference's ``seq_aligner`` scores and tie order: a gap in
    ``x``, then a gap in ``y``, then the diagonal): for every ``y[j]`` the aligned index in ``x``, or -1 when ``y[j]``
    is new (inserted)."""
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
    """How the edit caption's tokens read the source maps: ``mode`` replace (``mapper``) or refine (``index``,
    ``alpha``), optionally reweighted (``weights``, the reference's ``AttentionReweight`` with this alignment as its
    ``prev_controller``); "reweight" is refine with weights."""

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
        if self.mode == "reweight" and self.weights is None:
            raise ValueError("reweight needs weights (equalizer)")

    @property
    def reads_own(self) -> bool:
        """Whether eq. (F) needs the edit branch's own maps (a refine with tokens new in the edit)."""
        return self.mode != "replace" and bool((self.alpha < 1).any())

    @classmethod
    def identity(cls, length: int) -> Alignment:
        """Source maps as they are (a branch that carries the source caption)."""
        return cls("refine", length, index=torch.arange(length), alpha=torch.ones(length))


def edit_cross_attention(a_src: torch.Tensor, a_edit: torch.Tensor | None, alignment: Alignment,
                         window: torch.Tensor | None = None) -> torch.Tensor:
    """The edit branch's cross-attention maps, eq. (R) or (F), (W) and (C), ``[B, H, N, T]`` (float32).

    ``a_src`` are the source pass's maps for the same images; ``a_edit`` the edit branch's own (needed by a refine
    with new tokens and wherever ``window``, ``c_t`` ``[T]``, is 0). Without ``window`` every token is inside it.
    """
    a_src = a_src.float()
    if a_src.shape[-1] != alignment.length:
        raise ValueError(f"the source maps have {a_src.shape[-1]} tokens but the alignment {alignment.length}")
    if alignment.mode == "replace":
        out = a_src @ alignment.mapper.to(a_src)
    else:
        alpha = alignment.alpha.to(a_src)
        out = a_src.index_select(-1, alignment.index.to(a_src.device)) * alpha
        if alignment.reads_own:
            out = out + a_edit.float() * (1 - alpha)
    if alignment.weights is not None:
        out = out * alignment.weights.to(a_src)
    if window is None or bool((window >= 1).all()):
        return out
    c = window.to(a_src)
    return out * c + a_edit.float() * (1 - c)


# --- which layers --------------------------------------------------------------------------------------------------

def self_replace_layer(n_tokens: int, latent_tokens: int, fraction: float = SELF_REPLACE_FRACTION) -> bool:
    """Whether self-attention is replaced at a layer of ``n_tokens`` image tokens: at a quarter of the latent's side
    and below (16x16 and 8x8 on SD1.5's 64x64 latent, the reference's ``<= 16 ** 2``; 32x32 on SDXL's 128x128)."""
    return n_tokens <= latent_tokens * fraction


def blend_tokens(available: Sequence[int], target: int = BLEND_TOKENS) -> int:
    """Of the token counts of the cross-attention layers outside the middle block, the one the local blend reads: the
    reference's 16x16 maps (``target`` 256 tokens: the layers at a quarter of a 512-px SD1.x latent's side); where a
    model has no maps of that size, the nearest in log scale (the finer on a tie): 32x32 on SDXL at 1024 px, 8x8 on
    the toy model's 16x16 latent."""
    if not available:
        raise ValueError("no cross-attention layer outside the middle block to read the local blend's maps from")
    return min(sorted(set(available), reverse=True), key=lambda n: abs(math.log(n / target)))


# --- local blend -----------------------------------------------------------------------------------------------------

def blend_map(probs: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """``sum_j a_j A[..., j]`` averaged over heads: ``[B, H, N, T] -> [B, N]`` (float32)."""
    return (probs.float() * token_weights.to(probs.device, torch.float32)).sum(-1).mean(1)


def local_blend_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float = 0.3,
                     pool: int = BLEND_POOL) -> torch.Tensor:
    """Eq. (L) for one branch: ``maps`` ``[B, h, w]`` (summed over steps, averaged over layers and heads) -> a {0, 1}
    mask ``[B, 1, H, W]`` at ``size``: ``(2 pool + 1)``-square max-pool, nearest upsampling, division by each image's
    maximum, ``> threshold``. A map that is zero everywhere gives an empty mask (the reference's 0/0 compares
    false)."""
    m = maps.float()[:, None]
    if pool > 0:
        m = F.max_pool2d(m, 2 * pool + 1, stride=1, padding=pool)
    m = F.interpolate(m, size=tuple(size), mode="nearest")
    peak = m.amax(dim=(2, 3), keepdim=True)
    m = torch.where(peak > 0, m / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(m))
    return (m > threshold).float()


def blended_prediction(denoised: torch.Tensor, x: torch.Tensor, x_source_next: torch.Tensor, sigma: float,
                       sigma_next: float, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (L2) carried out by the sampler: the x0 prediction an Euler / DDIM step from ``x`` at ``sigma`` turns
    into ``x_next = x_src,next + mask (x_edt,next - x_src,next)``.

    The step is ``x_next = D + r (x - D)`` with ``r = sigma_next / sigma``; with ``D_src = (x_src,next - r x) / (1 -
    r)`` it lands on ``x_src,next`` from ``x``, so ``D' = D_src + mask (D - D_src)`` gives the blended latent
    exactly (at ``sigma_next = 0``, ``D_src = x_src,next``). Other samplers step from the same prediction.
    """
    r = sigma_next / sigma
    reference = (x_source_next.to(denoised) - r * x) / (1.0 - r)
    return torch.lerp(reference, denoised, mask.to(denoised).expand_as(denoised))  # exact at mask 0 and 1
