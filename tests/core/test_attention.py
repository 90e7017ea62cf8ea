"""Prompt-to-Prompt / Plug-and-Play rules (psedit_core.attention) against references written out here: one attention
layer ``softmax(Q K^T / sqrt(d)) V`` per head with the injected maps, token alignment for swaps, insertions and
deletions, local blend on synthetic maps, and the trajectory's implied step."""

from __future__ import annotations

import math

import pytest
import torch

from psedit_core.attention import (
    Alignment,
    attention_output,
    attention_probs,
    blend_map,
    blend_prediction,
    blend_resolution,
    edit_cross_attention,
    equalizer,
    global_align,
    local_blend_mask,
    refine_alignment,
    replace_chunks,
    replace_mapper,
    self_replace_layer,
    source_attention_output,
    trajectory_point,
    window_steps,
    word_positions,
)

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


def test_replace_mapper_spreads_a_word_over_more_tokens_and_shifts_the_rest():
    # "a cat sits" -> "a hedge hog sits" (one word of 2 tokens): source token 2 -> edit tokens 2 and 3 at 1/2 each
    m = replace_mapper([(1,), (2,), (3,)], [(1,), (7, 8), (3,)], 8)
    expected = torch.zeros(8, 8)
    expected[0, 0] = expected[1, 1] = 1.0  # start token, "a"
    expected[2, 2] = expected[2, 3] = 0.5  # cat -> hedge, hog
    expected[3, 4] = 1.0  # sits, one later
    for i in range(4, 7):  # end token and padding shifted; the last source token has no edit position left
        expected[i, i + 1] = 1.0
    assert torch.equal(m, expected)
    # two source tokens -> one edit token: the edit token collects both (mass kept)
    m2 = replace_mapper([(7, 8)], [(2,)], 6)
    assert m2[1, 1] == 1.0 and m2[2, 1] == 1.0 and m2[3, 2] == 1.0


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


def test_blend_resolution_is_a_quarter_of_the_side():
    assert blend_resolution([4096, 1024, 256, 64], 4096) == 256  # SD1.5 512 px: 16x16
    assert blend_resolution([16384, 4096, 1024], 16384) == 1024  # SDXL 1024 px: 32x32
    assert blend_resolution([256, 64, 16], 256) == 64  # 16x16 latent: 8x8, not the 4x4 a quarter would give
    assert blend_resolution([16, 4], 1024) == 16 and blend_resolution([16, 4], 64) == 4  # none as fine as 8x8
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


def test_blend_keeps_the_trajectory_outside_the_mask():
    latents, sigmas = trajectory()
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 1:, 1:] = 1
    x = latents[0].float().clone()
    x[..., 1:, 1:] += 0.7  # the edit has moved the inside
    for i in range(3):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        _, ref0 = trajectory_point(latents, sigmas, s)
        edit0 = rand(1, 2, 3, 3, seed=40 + i).float()
        d = blend_prediction(edit0, ref0, mask)
        assert torch.equal(d[..., 1:, 1:], edit0[..., 1:, 1:])
        x = x + (s_next - s) * (x - d) / s
        assert torch.allclose(x[..., :1, :], latents[i + 1][..., :1, :].float(), atol=1e-5)
        assert torch.allclose(x[..., :, :1], latents[i + 1][..., :, :1].float(), atol=1e-5)


def test_windows_are_fractions_and_may_be_empty():
    assert window_steps(0.0, 0.8, 50) == range(0, 40)
    assert window_steps(0.2, 0.2, 50) == range(10, 10) and len(window_steps(0.0, 0.0, 10)) == 0
    assert window_steps(0.0, 1.0, 7) == range(0, 7)
    with pytest.raises(ValueError, match="start = end"):
        window_steps(0.5, 0.4, 10)
