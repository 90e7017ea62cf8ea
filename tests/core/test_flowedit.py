"""FlowEdit (psedit_core.flowedit) on analytic flow-matching Gaussians: closed-form answers, the reductions the paper
implies, and the denoised form against the reference's velocity loop."""

import pytest
import torch

from psedit_core.analytic import FlowGaussianData
from psedit_core.flowedit import (
    PAPER_DEFAULTS,
    draw_noise,
    edited_branch,
    euler_step,
    flowedit,
    flowedit_denoised,
    handover_denoised,
    latent_mask,
    masked_denoised,
    noisy_source,
    plan_steps,
)

SHAPE = (2, 4, 8, 8)


def flow_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's schedule on a uniform t grid from 1 to 0."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def gaussian(seed: int, s_scale: float = 1.0) -> FlowGaussianData:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64)
    s = (0.5 + torch.rand(1, *SHAPE[1:], generator=g, dtype=torch.float64)) * s_scale
    return FlowGaussianData(mu, s)


@pytest.fixture(scope="module")
def x_src():
    return gaussian(0).sample(SHAPE, torch.Generator().manual_seed(1))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def reference_loop(v_src, v_tar, x_src, sigmas, n_max, n_min, n_avg, generator):
    """FlowEdit_utils.py's FlowEditSD3/FlowEditFLUX loop, in velocity form, transcribed (same draw order)."""
    T = sigmas.numel() - 1
    zt_edit = x_src.clone()
    xt_tar = None
    for i in range(T):
        if T - i > n_max:
            continue
        t_i, t_im1 = sigmas[i], sigmas[i + 1]
        if T - i > n_min:
            v_delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                fwd_noise = draw_noise(generator, x_src)
                zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src
                v_delta += (1 / n_avg) * (v_tar(zt_tar, t_i) - v_src(zt_src, t_i))
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta
        else:
            if i == T - n_min:
                fwd_noise = draw_noise(generator, x_src)
                xt_src = t_i * fwd_noise + (1 - t_i) * x_src
                xt_tar = zt_edit + xt_src - x_src
            xt_tar = xt_tar + (t_im1 - t_i) * v_tar(xt_tar, t_i)
    return zt_edit if n_min == 0 else xt_tar


def denoiser(model):
    return lambda x, sigma: model.denoiser(x, sigma)


def velocity(model):
    return lambda x, t: model.velocity(x, t)


# --- schedule bookkeeping -------------------------------------------------------------------------------------------

def test_plan_skips_the_first_steps_and_clamps():
    p = plan_steps(50, 33, 0)
    assert (p.start, p.flowedit_steps, p.n_min) == (17, 33, 0)
    p = plan_steps(28, 24, 4)
    assert (p.start, p.flowedit_steps) == (4, 20)
    p = plan_steps(10, 33, 12)  # more than the schedule holds: every step, all of them plain sampling
    assert (p.start, p.n_max, p.n_min, p.flowedit_steps) == (0, 10, 10, 0)
    with pytest.raises(ValueError, match="n_min .* must not exceed n_max"):
        plan_steps(50, 10, 11)
    with pytest.raises(ValueError, match=">= 0"):
        plan_steps(50, -1, 0)
    assert PAPER_DEFAULTS["SD3"]["n_max"] == 33 and PAPER_DEFAULTS["Flux"]["edit_guidance"] == 5.5


# --- the equations ----------------------------------------------------------------------------------------------------

def test_denoised_form_is_the_velocity_update(x_src):
    """FE5: an Euler step of D_FE from z is z + (sigma_next - sigma) V_delta, V_delta from FE3."""
    src, tar = gaussian(2), gaussian(3, 0.7)
    g = gen(4)
    z = x_src + 0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigma, sigma_next = torch.tensor([0.6, 0.6], dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    eps = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]
    z_src = [noisy_source(x_src, sigma, e) for e in eps]
    z_tar = [edited_branch(z, zs, x_src) for zs in z_src]
    v_delta = sum(tar.velocity(zt, 0.6) - src.velocity(zs, 0.6) for zs, zt in zip(z_src, z_tar, strict=True)) / 3
    d_fe = flowedit_denoised(x_src, [tar.denoiser(zt, sigma) - src.denoiser(zs, sigma)
                                     for zs, zt in zip(z_src, z_tar, strict=True)])
    assert torch.allclose(d_fe, z - 0.6 * v_delta, atol=1e-12)
    assert torch.allclose(euler_step(z, d_fe, sigma, sigma_next), z + (0.45 - 0.6) * v_delta, atol=1e-12)


def test_handover_lands_on_the_plain_step(x_src):
    """FE8: from z, one Euler step of D_hand reaches x_tar + (sigma_next - sigma) v_tar(x_tar)."""
    tar = gaussian(5)
    g = gen(6)
    z = x_src + 0.2 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x_tar = z + 0.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigma = torch.full((2,), 0.3, dtype=torch.float64)
    d = handover_denoised(z, x_tar, tar.denoiser(x_tar, sigma), sigma, 0.1)
    assert torch.allclose(euler_step(z, d, sigma, 0.1), x_tar + (0.1 - 0.3) * tar.velocity(x_tar, 0.3), atol=1e-12)
    with pytest.raises(ValueError, match="strictly decrease"):
        handover_denoised(z, x_tar, x_tar, sigma, 0.3)


def test_mask_scales_the_velocity(x_src):
    """FE9: the masked prediction's velocity is m times the prediction's; m = 0 gives exactly x (a zero step)."""
    d = x_src.flip(-1)
    m = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    m[..., 4:] = 0.25
    out = masked_denoised(x_src, d, m)
    assert torch.equal(out[..., :4], x_src[..., :4])
    assert torch.allclose(x_src - out, m * (x_src - d), atol=1e-15)
    assert masked_denoised(x_src, d, None) is d


# --- closed-form answers and reductions -------------------------------------------------------------------------------

def test_same_caption_returns_the_photo_exactly(x_src):
    model = gaussian(7)
    out = flowedit(denoiser(model), denoiser(model), x_src, flow_sigmas(12), n_max=9, n_avg=2, generator=gen())
    assert torch.equal(out, x_src)
    edited = flowedit(denoiser(model), denoiser(gaussian(8)), x_src, flow_sigmas(12), n_max=9, generator=gen())
    assert (edited - x_src).abs().max() > 0.1  # the test can fail: another caption does edit


def test_n_max_zero_returns_the_photo(x_src):
    out = flowedit(denoiser(gaussian(7)), denoiser(gaussian(8)), x_src, flow_sigmas(12), n_max=0, generator=gen())
    assert torch.equal(out, x_src)


@pytest.mark.parametrize("n_max", [1, 5, 12])
def test_point_masses_move_the_photo_by_the_difference_of_means(x_src, n_max):
    """Captions whose data are points (s = 0: D = mu whatever the input): each step multiplies z - x_src - d by
    sigma_next / sigma, so from any start the edit ends at x_src + (mu_tar - mu_src) at sigma 0, and at
    d (1 - sigma_end / sigma_start) on a schedule cut before 0."""
    src, tar = gaussian(9, 0.0), gaussian(10, 0.0)
    d = tar.mu - src.mu
    sigmas = flow_sigmas(12)
    out = flowedit(denoiser(src), denoiser(tar), x_src, sigmas, n_max=n_max, generator=gen())
    assert torch.allclose(out, x_src + d, atol=1e-12)
    cut = sigmas[:-3]  # 9 steps, ending at sigmas[9] > 0
    start = 9 - min(n_max, 9)
    out = flowedit(denoiser(src), denoiser(tar), x_src, cut, n_max=n_max, generator=gen())
    assert torch.allclose(out, x_src + d * (1 - cut[-1] / cut[start]), atol=1e-12)


def test_noise_cancels_for_equal_variances_only(x_src):
    """With the same data variance for both captions the two branches' noise cancels in FE3 (V_delta is affine in
    z - x_src alone), so the seed does not matter; with different variances it does."""
    src, tar = gaussian(11), gaussian(12)
    tar = FlowGaussianData(tar.mu, src.s)
    runs = [flowedit(denoiser(src), denoiser(tar), x_src, flow_sigmas(10), n_max=8, generator=gen(s)) for s in (0, 1)]
    assert torch.allclose(runs[0], runs[1], atol=1e-12) and (runs[0] - x_src).abs().max() > 0.1
    tar = FlowGaussianData(tar.mu, src.s * 0.5)
    runs = [flowedit(denoiser(src), denoiser(tar), x_src, flow_sigmas(10), n_max=8, generator=gen(s)) for s in (0, 1)]
    assert (runs[0] - runs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("n_max,n_min,n_avg", [(8, 0, 1), (10, 0, 3), (8, 3, 2), (10, 10, 1), (6, 6, 2)])
def test_equals_the_reference_loop(x_src, n_max, n_min, n_avg):
    """flowedit() in denoised form (what the sampler computes) against the reference's velocity loop, same draws."""
    src, tar = gaussian(13), gaussian(14, 0.6)
    sigmas = flow_sigmas(10)
    ours = flowedit(denoiser(src), denoiser(tar), x_src, sigmas, n_max=n_max, n_min=n_min, n_avg=n_avg,
                    generator=gen(3))
    ref = reference_loop(velocity(src), velocity(tar), x_src, sigmas, n_max, n_min, n_avg, gen(3))
    assert torch.allclose(ours, ref, atol=1e-10), (ours - ref).abs().max()
    assert (ours - x_src).abs().max() > 0.05


def test_n_min_equal_to_all_steps_is_plain_sampling_from_the_first_draw(x_src):
    """n_max = n_min = T: FE6 at sigma 1 is pure noise (the first draw), then Euler sampling of the edit caption."""
    tar = gaussian(15)
    sigmas = flow_sigmas(10)
    out = flowedit(denoiser(gaussian(16)), denoiser(tar), x_src, sigmas, n_max=10, n_min=10, generator=gen(5))
    x = draw_noise(gen(5), x_src)
    for i in range(10):
        x = euler_step(x, tar.denoiser(x, sigmas[i].expand(2)), sigmas[i], sigmas[i + 1])
    assert torch.allclose(out, x, atol=1e-10)


def test_masked_edit_keeps_the_photo_exactly_outside(x_src):
    src, tar = gaussian(17), gaussian(18)
    m = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    m[..., :, 3:6] = 1.0
    for n_min in (0, 2):
        out = flowedit(denoiser(src), denoiser(tar), x_src, flow_sigmas(10), n_max=8, n_min=n_min,
                       generator=gen(), mask=m)
        outside = (m == 0).expand_as(out)
        assert torch.equal(out[outside], x_src[outside])
        assert (out - x_src)[~outside].abs().max() > 0.1


def test_latent_mask_is_the_block_mean_of_the_placed_mask():
    mask = torch.zeros(1, 70, 64)  # painted on a 70 px high photo: VAE encode crops 3 rows off the top, 3 off the foot
    mask[:, 3 + 8:3 + 16, 20:32] = 1.0
    m = latent_mask(mask, (8, 8), 8)
    assert m.shape == (1, 1, 8, 8)
    assert torch.equal(m[0, 0, 1, 3], torch.tensor(1.0)) and m[0, 0, 1, 2] == 4 / 8 and m[0, 0, 1, 2 - 1] == 0
    assert m[0, 0, 0].abs().sum() == 0 and m[0, 0, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="another aspect ratio"):
        latent_mask(torch.ones(1, 64, 128), (8, 8), 8)
