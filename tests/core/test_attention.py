"""Prompt-to-Prompt / Plug-and-Play rules (psedit_core.attention, psedit_core.p2p, psedit_core.pnp) against
references written out here from the reference code's semantics: one attention layer ``softmax(Q K^T / sqrt(d)) V``
per head with the injected maps, token alignment for swaps (the reference's ``get_replacement_mapper_``), insertions
and deletions, per-word windows, window counting, local blend on synthetic maps and on a latent, and the
trajectory's implied step."""

from __future__ import annotations

import math

import pytest
import torch

from psedit_core.attention import (
    attention_output,
    attention_probs,
    blend_start_step,
    cross_steps,
    replace_chunks,
    source_attention_output,
    trajectory_point,
    truncated_steps,
)
from psedit_core.p2p import (
    Alignment,
    blend_map,
    blend_tokens,
    blended_prediction,
    edit_cross_attention,
    equalizer,
    global_align,
    local_blend_mask,
    refine_alignment,
    replace_mapper,
    self_replace_layer,
    word_positions,
    words_alpha,
)
from psedit_core.pnp import default_feature_block

HEADS, D, N, T = 2, 4, 6, 8
BOS, EOS = 100, 101


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_probs(q, k, heads):
    """softmax(Q K^T / sqrt(d)) with explicit loops over images and heads: [B, H, N, T]."""
    b, n, c = q.shape
    d = c // heads
    out = torch.zeros(b, heads, n, k.shape[1], dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            qh, kh = q[i, :, h * d:(h + 1) * d].double(), k[i, :, h * d:(h + 1) * d].double()
            out[i, h] = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
    return out


def ref_output(probs, v, heads):
    """O = A V per head, heads concatenated: [B, N, H d]."""
    b, _, n, _ = probs.shape
    d = v.shape[-1] // heads
    out = torch.zeros(b, n, heads * d, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            out[i, :, h * d:(h + 1) * d] = probs[i, h].double() @ v[i, :, h * d:(h + 1) * d].double()
    return out


def layer():
    """One cross-attention layer's inputs: the source pass's q/k and the edit branch's q/k/v (different text)."""
    return dict(q_src=rand(1, N, HEADS * D, seed=1), k_src=rand(1, T, HEADS * D, seed=2),
                q_edit=rand(1, N, HEADS * D, seed=3), k_edit=rand(1, T, HEADS * D, seed=4),
                v_edit=rand(1, T, HEADS * D, seed=5))


def test_probs_and_output_are_softmax_qk_v_per_head():
    x = layer()
    p = attention_probs(x["q_edit"], x["k_edit"], HEADS)
    assert p.shape == (1, HEADS, N, T) and p.dtype == torch.float32
    assert torch.allclose(p.double(), ref_probs(x["q_edit"], x["k_edit"], HEADS), atol=1e-6)
    out = attention_output(p, x["v_edit"], HEADS)
    assert out.dtype == torch.float64  # v's dtype
    assert torch.allclose(out, ref_output(ref_probs(x["q_edit"], x["k_edit"], HEADS), x["v_edit"], HEADS), atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(1, -1, HEADS, D).transpose(1, 2) for t in (x["q_edit"], x["k_edit"], x["v_edit"])))
    assert torch.allclose(out, sdpa.transpose(1, 2).reshape(1, N, HEADS * D), atol=1e-6)


# --- replace ---------------------------------------------------------------------------------------------------------

def test_replace_mapper_for_a_one_token_swap_is_the_identity_on_positions():
    # "a cat on a sofa" -> "a dog on a sofa": every word one token
    src = [(1,), (2,), (3,), (1,), (4,)]
    edit = [(1,), (9,), (3,), (1,), (4,)]
    m = replace_mapper(src, edit, T + 4)
    assert torch.equal(m, torch.eye(T + 4))


def ref_replacement_mapper(words_x, words_y, max_len):
    """The reference's ``get_replacement_mapper_`` written out on word token lists: swapped words (differing) map
    source tokens onto edit tokens (spread 1/n_e when their counts differ); between swaps positions advance in step;
    once no swap is left, ``mapper[j, j] = 1`` for every remaining position."""
    def inds(words, k):
        start = 1 + sum(len(w) for w in words[:k])
        return list(range(start, start + len(words[k])))

    swaps = [k for k in range(len(words_y)) if tuple(words_y[k]) != tuple(words_x[k])]
    src, tgt = [inds(words_x, k) for k in swaps], [inds(words_y, k) for k in swaps]
    mapper = torch.zeros(max_len, max_len)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(tgt[cur]):
                mapper[src[cur], tgt[cur]] = 1
            else:
                for t in tgt[cur]:
                    mapper[src[cur], t] = 1 / len(tgt[cur])
            i, j = i + len(src[cur]), j + len(tgt[cur])
            cur += 1
        elif cur < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return mapper


CAPTION_PAIRS = [  # word token lists: one-token swap, a word of 2 tokens, 2 -> 1, two swaps, none
    ([(1,), (2,), (3,)], [(1,), (9,), (3,)]),
    ([(1,), (2,), (3,)], [(1,), (7, 8), (3,)]),
    ([(7, 8), (3,)], [(2,), (3,)]),
    ([(1,), (2,), (3,), (4,), (5,)], [(1,), (7, 8), (3,), (6,), (5,)]),
    ([(1,), (2,)], [(1,), (2,)]),
]


@pytest.mark.parametrize("words", CAPTION_PAIRS)
def test_replace_mapper_is_the_references(words):
    assert torch.equal(replace_mapper(*words, 12), ref_replacement_mapper(*words, 12))


def test_replace_mapper_spreads_a_word_over_more_tokens_then_maps_by_position():
    # "a cat sits" -> "a hedge hog sits" (one word of 2 tokens): source token 2 -> edit tokens 2 and 3 at 1/2 each
    m = replace_mapper([(1,), (2,), (3,)], [(1,), (7, 8), (3,)], 8)
    expected = torch.zeros(8, 8)
    expected[0, 0] = expected[1, 1] = 1.0  # start token, "a"
    expected[2, 2] = expected[2, 3] = 0.5  # cat -> hedge, hog
    for i in range(4, 8):  # the reference: after the swap, edit token j reads source token j ("sits" reads "</s>")
        expected[i, i] = 1.0
    assert torch.equal(m, expected)
    shifted = replace_mapper([(1,), (2,), (3,)], [(1,), (7, 8), (3,)], 8, tail="shifted")  # PSEdit's
    assert shifted[3, 4] == 1.0 and shifted[4, 5] == 1.0 and shifted[4, 4] == 0.0  # "sits" reads "sits"
    assert torch.equal(shifted[:, :4], m[:, :4])
    # two source tokens -> one edit token: the edit token collects both (mass kept)
    m2 = replace_mapper([(7, 8)], [(2,)], 6)
    assert m2[1, 1] == 1.0 and m2[2, 1] == 1.0 and m2[2, 2] == 1.0 and m2[3, 3] == 1.0


def test_replace_rejects_captions_whose_word_counts_differ():
    with pytest.raises(ValueError, match="refine"):
        replace_mapper([(1,), (2,)], [(1,), (5,), (2,)], T)


def test_replace_layer_against_reference():
    x = layer()
    m = replace_mapper([(1,), (2,), (3,)], [(1,), (7, 8), (3,)], T)
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    a_edit = attention_probs(x["q_edit"], x["k_edit"], HEADS)
    got = attention_output(edit_cross_attention(a_src, a_edit, Alignment("replace", T, mapper=m)), x["v_edit"], HEADS)
    ref_src = ref_probs(x["q_src"], x["k_src"], HEADS)
    ref = torch.zeros_like(ref_src)
    for j in range(T):
        for i in range(T):
            ref[..., j] += ref_src[..., i] * float(m[i, j])
    assert torch.allclose(got, ref_output(ref, x["v_edit"], HEADS), atol=1e-5)
    # the edit's own maps play no part in replace
    other = attention_probs(rand(1, N, HEADS * D, seed=9), x["k_edit"], HEADS)
    again = edit_cross_attention(a_src, other, Alignment("replace", T, mapper=m))
    assert torch.equal(again, edit_cross_attention(a_src, a_edit, Alignment("replace", T, mapper=m)))


# --- refine ----------------------------------------------------------------------------------------------------------

def test_global_align_insertion_deletion_and_swap():
    assert global_align([BOS, 1, 2, EOS], [BOS, 1, 5, 2, EOS]) == [0, 1, -1, 2, 3]  # "a cat" -> "a big cat"
    assert global_align([BOS, 1, 5, 2, EOS], [BOS, 1, 2, EOS]) == [0, 1, 3, 4]  # "a big cat" -> "a cat"
    # a swapped token is cheaper as a deletion plus an insertion (gap 0) than as a mismatch (-1): new in the edit
    assert global_align([BOS, 1, 2, EOS], [BOS, 1, 9, EOS]) == [0, 1, -1, 3]
    assert global_align([BOS, 3, 4, EOS], [BOS, 3, 4, EOS]) == [0, 1, 2, 3]


def test_refine_alignment_pads_with_identity():
    index, alpha = refine_alignment([BOS, 1, 2, EOS], [BOS, 1, 5, 2, EOS], T)
    assert index.tolist() == [0, 1, 0, 2, 3, 5, 6, 7]
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="shorten"):
        refine_alignment(list(range(T + 1)), [BOS, EOS], T)


def test_refine_layer_against_reference():
    x = layer()
    index, alpha = refine_alignment([BOS, 1, 2, EOS], [BOS, 1, 5, 2, EOS], T)
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    a_edit = attention_probs(x["q_edit"], x["k_edit"], HEADS)
    got = attention_output(edit_cross_attention(a_src, a_edit, Alignment("refine", T, index=index, alpha=alpha)),
                           x["v_edit"], HEADS)
    rs, re = ref_probs(x["q_src"], x["k_src"], HEADS), ref_probs(x["q_edit"], x["k_edit"], HEADS)
    ref = torch.empty_like(rs)
    source_of = {0: 0, 1: 1, 3: 2, 4: 3, 5: 5, 6: 6, 7: 7}  # edit token -> source token; 2 ("big") is new
    for j in range(T):
        ref[..., j] = rs[..., source_of[j]] if j in source_of else re[..., j]
    assert torch.allclose(got, ref_output(ref, x["v_edit"], HEADS), atol=1e-5)


def test_identity_alignment_gives_the_source_maps():
    x = layer()
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    out = edit_cross_attention(a_src, attention_probs(x["q_edit"], x["k_edit"], HEADS), Alignment.identity(T))
    assert torch.equal(out, a_src)


# --- reweight --------------------------------------------------------------------------------------------------------

def test_reweight_layer_against_reference():
    x = layer()
    w = equalizer(T, [2, 3], 2.5)
    assert w.tolist() == [1, 1, 2.5, 2.5, 1, 1, 1, 1]
    same = refine_alignment([BOS, 1, 2, 3, EOS], [BOS, 1, 2, 3, EOS], T)
    align = Alignment("reweight", T, index=same[0], alpha=same[1], weights=w)
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    got = attention_output(edit_cross_attention(a_src, attention_probs(x["q_edit"], x["k_edit"], HEADS), align),
                           x["v_edit"], HEADS)
    rs = ref_probs(x["q_src"], x["k_src"], HEADS)
    ref = rs.clone()
    ref[..., 2] *= 2.5
    ref[..., 3] *= 2.5  # P2P does not renormalise
    assert torch.allclose(got, ref_output(ref, x["v_edit"], HEADS), atol=1e-5)
    assert not torch.allclose(got, ref_output(rs, x["v_edit"], HEADS), atol=1e-3)


def test_word_positions_after_the_start_token():
    assert [list(r) for r in word_positions([(1,), (7, 8), (3,)])] == [[1], [2, 3], [4]]


# --- self-attention (P2P replacement, PnP query/key injection) -------------------------------------------------------

def test_self_attention_reads_the_source_maps_for_every_branch():
    q_src, k_src = rand(1, N, HEADS * D, seed=11), rand(1, N, HEADS * D, seed=12)
    v = rand(3, N, HEADS * D, seed=13)  # three branches (edit, null, source) of one image
    got = source_attention_output(q_src, k_src, v, HEADS)
    maps = ref_probs(q_src, k_src, HEADS)
    for c in range(3):
        assert torch.allclose(got[c:c + 1], ref_output(maps, v[c:c + 1], HEADS), atol=1e-5)


def test_replace_chunks_only_touches_flagged_branches():
    t = rand(3, 2, 5, seed=1)
    src = rand(1, 2, 5, seed=2)
    out = replace_chunks(t, src, [True, False, True])
    assert torch.equal(out[0], src[0]) and torch.equal(out[1], t[1]) and torch.equal(out[2], src[0])
    assert not torch.equal(t[0], src[0])  # input untouched
    with pytest.raises(ValueError):
        replace_chunks(t, src, [True, False])


# --- local blend -----------------------------------------------------------------------------------------------------

def ref_mask(maps, size, threshold):
    """3x3 max filter with explicit loops, nearest upsampling by an integer factor, max-normalise, threshold."""
    b, h, w = maps.shape
    pooled = torch.zeros_like(maps)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                pooled[i, y, x] = maps[i, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].max()
    f = size[0] // h
    up = pooled.repeat_interleave(f, 1).repeat_interleave(f, 2)
    up = up / up.amax(dim=(1, 2), keepdim=True)
    return (up > threshold).float()[:, None]


def test_local_blend_mask_on_synthetic_maps():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 2, 16, 5, generator=g) * 0.01  # 4x4 image tokens, 5 text tokens
    probs[:, :, 5, 3] = 1.0  # token 3 looks at pixel (1, 1)
    probs[:, :, 10, 3] = 0.5  # and, less, at pixel (2, 2)
    weights = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    m = blend_map(probs, weights)
    assert m.shape == (1, 16)
    assert torch.allclose(m, probs[:, :, :, 3].mean(1))
    maps = m.reshape(1, 4, 4)
    mask = local_blend_mask(maps, (8, 8), threshold=0.3)
    assert mask.shape == (1, 1, 8, 8)
    assert torch.equal(mask, ref_mask(maps, (8, 8), 0.3))
    # the 3x3 pool grows each peak by one map pixel (two latent pixels): (1,1) covers rows/cols 0..5 of the latent
    assert mask[0, 0, 0:6, 0:6].all() and mask[0, 0, 6:, :2].sum() == 0
    assert torch.equal(local_blend_mask(maps, (8, 8), threshold=0.6), ref_mask(maps, (8, 8), 0.6))
    assert local_blend_mask(torch.zeros(1, 4, 4), (8, 8)).sum() == 0


def test_blend_reads_the_references_16x16_maps_or_the_nearest():
    assert blend_tokens([4096, 1024, 256]) == 256  # SD1.5 512 px: 16x16, the reference's
    assert blend_tokens([4096, 1024]) == 1024  # SDXL 1024 px (no 16x16 maps outside the middle): 32x32
    assert blend_tokens([64, 16]) == 64  # the toy model's 16x16 latent: 8x8
    assert blend_tokens([1024, 64]) == 1024  # a tie in log scale: the finer
    assert self_replace_layer(256, 4096) and self_replace_layer(64, 4096) and not self_replace_layer(1024, 4096)


# --- the trajectory as the source branch -----------------------------------------------------------------------------

def trajectory():
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    latents = tuple(rand(1, 2, 3, 3, seed=20 + i) for i in range(4))
    return latents, sigmas


def test_trajectory_point_on_and_between_levels():
    latents, sigmas = trajectory()
    x, x0 = trajectory_point(latents, sigmas, 2.0)
    assert torch.allclose(x, latents[1].float())
    # one Euler step from the trajectory's latent with its implied x0 lands on the next latent
    step = x + (1.0 - 2.0) * (x - x0) / 2.0
    assert torch.allclose(step, latents[2].float(), atol=1e-6)
    mid, mid0 = trajectory_point(latents, sigmas, 3.0)
    assert torch.allclose(mid, (latents[0] + latents[1]).float() / 2, atol=1e-6)
    assert torch.allclose(mid0, trajectory_point(latents, sigmas, 4.0)[1], atol=1e-5)  # x0 constant on a piece
    last, last0 = trajectory_point(latents, sigmas, 0.0)
    assert torch.equal(last, latents[3].float()) and torch.equal(last0, last)
    with pytest.raises(ValueError, match="SIGMAS"):
        trajectory_point(latents, sigmas, 5.0)


def test_blend_puts_the_latent_where_the_reference_puts_it():
    """An Euler / DDIM step from the blended prediction lands on ``x_src + mask (x_edit - x_src)``, the latent the
    reference's LocalBlend makes after the step, for any current latent (off the trajectory too) and any mask."""
    latents, sigmas = trajectory()
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 1:, 1:] = 1
    x = latents[0].float().clone() + 0.3 * rand(1, 2, 3, 3, seed=7).float()  # drifted off the trajectory everywhere
    for i in range(3):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        edit0 = rand(1, 2, 3, 3, seed=40 + i).float()
        plain = x + (s_next - s) * (x - edit0) / s  # the edit branch's own step
        reference = latents[i + 1].float() + mask * (plain - latents[i + 1].float())
        d = blended_prediction(edit0, x, latents[i + 1].float(), s, s_next, mask)
        x = x + (s_next - s) * (x - d) / s
        assert torch.allclose(x, reference, atol=1e-5)
    assert torch.allclose(x[..., :1, :], latents[3][..., :1, :].float(), atol=1e-6)


def test_windows_count_as_the_reference():
    """Cross-attention on n + 1 rows, ``int`` not ``round`` (``update_alpha_time_word``); self-attention, the blend's
    start and Plug-and-Play on n."""
    for n in range(1, 51):
        assert cross_steps(0.0, 0.8, n) == range(0, min(int(0.8 * (n + 1)), n))
        assert truncated_steps(0.0, 0.4, n) == range(0, int(0.4 * n))
        assert blend_start_step(0.2, n) == int(0.2 * n)
    assert cross_steps(0.0, 0.8, 50) == range(0, 40) and cross_steps(0.0, 0.8, 4) == range(0, 4)
    assert truncated_steps(0.0, 0.8, 4) == range(0, 3)  # round would give 0..3 (one step more)
    assert len(cross_steps(0.2, 0.2, 50)) == 0 and len(truncated_steps(0.0, 0.0, 10)) == 0
    assert truncated_steps(0.0, 1.0, 7) == range(0, 7) and cross_steps(0.0, 1.0, 7) == range(0, 7)
    with pytest.raises(ValueError, match="start = end"):
        truncated_steps(0.5, 0.4, 10)


def test_per_word_windows_override_the_default():
    """``get_time_words_attention_alpha`` with ``{"default_": 0.8, "tiger": 0.2}``: every token in steps
    < int(0.8 (n + 1)), the tiger's tokens only in steps < int(0.2 (n + 1))."""
    alpha = words_alpha(10, T, (0.0, 0.8), [([2, 3], (0.0, 0.2)), ([5], (0.5, 1.0))])
    assert alpha.shape == (10, T)
    assert alpha[:, 0].tolist() == [1.0] * 8 + [0.0] * 2
    assert alpha[:, 2].tolist() == [1.0] * 2 + [0.0] * 8 and torch.equal(alpha[:, 2], alpha[:, 3])
    assert alpha[:, 5].tolist() == [0.0] * 5 + [1.0] * 5


def test_a_window_of_zero_keeps_the_edits_own_maps():
    x = layer()
    m = replace_mapper([(1,), (2,), (3,)], [(1,), (9,), (3,)], T)
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    a_edit = attention_probs(x["q_edit"], x["k_edit"], HEADS)
    window = torch.ones(T)
    window[2] = 0.0  # "dog" outside its window
    got = edit_cross_attention(a_src, a_edit, Alignment("replace", T, mapper=m), window=window)
    full = edit_cross_attention(a_src, a_edit, Alignment("replace", T, mapper=m))
    assert torch.equal(got[..., 2], a_edit[..., 2].float()) and torch.equal(got[..., 3:], full[..., 3:])


def test_reweight_rides_on_a_replace():
    """The reference's ``AttentionReweight(prev_controller=AttentionReplace)``: the swap's maps times the equalizer."""
    x = layer()
    m = replace_mapper([(1,), (2,), (3,)], [(1,), (9,), (3,)], T)
    w = equalizer(T, [2], 3.0)
    a_src = attention_probs(x["q_src"], x["k_src"], HEADS)
    got = edit_cross_attention(a_src, None, Alignment("replace", T, mapper=m, weights=w))
    assert torch.allclose(got, (a_src @ m) * w)
    assert not torch.allclose(got, a_src @ m)


def test_pnp_feature_block_is_the_references():
    sd15 = [False, False, False, True, True, True, True, True, True, True, True, True]  # SD1.x output blocks
    assert default_feature_block(sd15) == 4  # up_blocks[1].resnets[1]
    assert default_feature_block([True] * 9) == 1  # SDXL
