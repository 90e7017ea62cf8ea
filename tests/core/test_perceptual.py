import logging

import pytest
import torch

from psedit_core.analytic import GaussianData
from psedit_core.inversion import ddim_invert, euler_sample, to_eps
from psedit_core.perceptual import (
    PerceptualGuidanceConfig,
    guidance_delta,
    perceptual_guidance,
    tweedie_x0,
    tweedie_x0_alpha,
    tweedie_x0_from_score,
)
from psedit_core.schedule import StepWindow, sigma_to_alpha_bar


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    return GaussianData(torch.randn(1, 4, 8, 8, generator=g), 0.4 + torch.rand(1, 4, 8, 8, generator=g))


def test_tweedie_is_exact_for_gaussian(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g) * 2
    sigma = torch.tensor([0.7, 0.7, 0.7])
    posterior_mean = model.denoiser(x, sigma)  # closed form E[x0 | x]
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(model.log_density(xr, sigma).sum(), xr)  # autograd score of p_sigma
    assert torch.allclose(tweedie_x0_from_score(x, sigma, score), posterior_mean, atol=1e-5)
    eps = to_eps(x, sigma, posterior_mean)
    assert torch.allclose(tweedie_x0(x, sigma, eps), posterior_mean, atol=1e-5)
    # The paper's DDPM form on z_t = sqrt(abar) x gives the same x0.
    abar = sigma_to_alpha_bar(sigma)
    z_t = x * abar.sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(tweedie_x0_alpha(z_t, abar, eps), posterior_mean, atol=1e-5)


def test_guidance_delta_modes():
    g = torch.zeros(2, 1, 2, 2)
    g[0] = 2.0
    g[1] = 0.5
    plain = guidance_delta(g, PerceptualGuidanceConfig(scale=3.0))
    assert torch.allclose(plain, 3.0 * 4 * g)  # x the 4 latent elements per sample: the summed loss's gradient
    norm = guidance_delta(g, PerceptualGuidanceConfig(scale=3.0, step="normalized"))
    assert torch.allclose(norm, torch.full_like(g, 3.0))  # RMS length = scale for every sample
    clipped = guidance_delta(g, PerceptualGuidanceConfig(scale=1.0, clip=1.0))
    assert torch.allclose(clipped[0], 4 * torch.ones(1, 2, 2)) and torch.allclose(clipped[1], 4 * g[1])
    bad = g.clone()
    bad[1, 0, 0, 0] = float("nan")
    out = guidance_delta(bad, PerceptualGuidanceConfig(scale=1.0))
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0 and torch.allclose(out[0], 4 * g[0])


def test_config_validation():
    for kwargs in ({"scale": -1}, {"scale": float("nan")}, {"scale": 1, "gradient": "x"}, {"scale": 1, "step": "y"},
                   {"scale": 1, "clip": 0}, {"scale": 1, "target": "z"}):
        with pytest.raises(ValueError):
            PerceptualGuidanceConfig(**kwargs)


class Setup:
    """An edit scenario on the analytic model: the source latent z_src, a denoiser that pulls toward another
    mean (the "edit"), a fixed differentiable decoder and an MSE loss against the decoded source."""

    def __init__(self):
        g = torch.Generator().manual_seed(4)
        self.src_model = GaussianData(torch.randn(1, 4, 8, 8, generator=g), torch.full((1, 4, 8, 8), 0.5))
        self.edit_model = GaussianData(self.src_model.mu + 1.5, self.src_model.s)
        self.z_src = self.src_model.sample((1, 4, 8, 8), g)
        self.weight = torch.randn(3, 4, 1, 1, generator=g) * 0.5
        self.source_image = self.decode(self.z_src)
        self.sigmas = torch.cat([torch.linspace(14.6, 0.03, 20), torch.zeros(1)])
        self.x_T = ddim_invert(self.src_model.denoiser, self.z_src, self.sigmas, refine=4).inverted

    def decode(self, z):
        return torch.sigmoid(torch.nn.functional.conv2d(z, self.weight))

    def loss(self, image):
        return (image - self.source_image).pow(2).flatten(1).mean(1)

    def run(self, config, **kw):
        d = perceptual_guidance(self.edit_model.denoiser, self.decode, self.loss, config, **kw)
        return euler_sample(d, self.x_T, self.sigmas)


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.mark.parametrize("gradient", ["x0", "full"])
@pytest.mark.parametrize("step,scale", [("plain", 4.0), ("normalized", 0.3)])
def test_guidance_lowers_loss_to_source(setup, gradient, step, scale):
    unguided = setup.run(PerceptualGuidanceConfig(scale=0.0))
    guided = setup.run(PerceptualGuidanceConfig(scale=scale, gradient=gradient, step=step))
    l0 = setup.loss(setup.decode(unguided)).item()
    l1 = setup.loss(setup.decode(guided)).item()
    assert l1 < 0.5 * l0, (l0, l1)


def test_full_gradient_includes_denoiser_jacobian(setup):
    """Through the analytic denoiser dD/dx = s^2/(s^2+sigma^2) I, so the full gradient is the x0 gradient
    scaled by that factor."""
    seen = {}
    sigma = torch.tensor([1.3])
    x = setup.x_T / 10
    for mode in ("x0", "full"):
        d = perceptual_guidance(setup.edit_model.denoiser, setup.decode, setup.loss,
                                PerceptualGuidanceConfig(scale=1.0, gradient=mode),
                                on_step=lambda info, mode=mode: seen.setdefault(mode, info["grad_rms"]))
        d(x, sigma)
    factor = 0.25 / (0.25 + 1.3**2)
    assert seen["x0"].item() > 0
    assert seen["full"].item() == pytest.approx(factor * seen["x0"].item(), rel=1e-4)


def test_window_outside_is_identity(setup):
    window = StepWindow(0.5, 1.0)
    sigmas = setup.sigmas
    d = perceptual_guidance(setup.edit_model.denoiser, setup.decode, setup.loss, PerceptualGuidanceConfig(scale=5.0),
                            active=lambda s: window.contains(sigmas, s))
    x = setup.x_T
    early, late = sigmas[2].reshape(1), sigmas[15].reshape(1)
    assert torch.equal(d(x, early), setup.edit_model.denoiser(x, early))
    assert not torch.allclose(d(x / 5, late), setup.edit_model.denoiser(x / 5, late))


def test_nan_gradient_is_skipped_and_logged(setup, caplog):
    def nan_loss(image):
        return image.sum(dim=(1, 2, 3)) * float("nan")

    d = perceptual_guidance(setup.edit_model.denoiser, setup.decode, nan_loss, PerceptualGuidanceConfig(scale=1.0))
    sigma = torch.tensor([2.0])
    with caplog.at_level(logging.WARNING):
        out = d(setup.x_T, sigma)
    assert torch.isfinite(out).all()
    assert torch.equal(out, setup.edit_model.denoiser(setup.x_T, sigma))
    assert "not finite" in caplog.text


def test_nan_prediction_raises(setup):
    d = perceptual_guidance(lambda x, s: x * float("nan"), setup.decode, setup.loss, PerceptualGuidanceConfig(1.0))
    with pytest.raises(FloatingPointError, match="fp32"):
        d(setup.x_T, torch.tensor([2.0]))


def test_works_under_inference_mode_and_leaves_inputs(setup):
    d = perceptual_guidance(setup.edit_model.denoiser, setup.decode, setup.loss, PerceptualGuidanceConfig(scale=2.0),
                            on_step=lambda info: steps.append(info))
    steps = []
    with torch.inference_mode():
        x = setup.x_T.clone()
        sigma = torch.tensor([1.0])
        out = d(x, sigma)
        assert torch.equal(x, setup.x_T)
    plain = setup.edit_model.denoiser(setup.x_T, torch.tensor([1.0]))
    assert not torch.allclose(out, plain)
    assert steps and steps[0]["loss"].shape == (1,) and not steps[0]["skipped"]


@pytest.mark.parametrize("target", ["noise", "x0", "latent"])
def test_euler_step_moves_the_latent_as_documented(setup, target):
    """noise: an Euler step moves the latent by (sigma - sigma_next) * delta more; x0: by (1 - sigma_next/sigma);
    latent: by delta itself, on every step."""
    cfg = PerceptualGuidanceConfig(scale=0.2, step="normalized", target=target)
    sigmas = torch.tensor([2.0, 1.5, 0.0])

    def next_sigma(sigma):
        return sigmas[(sigmas - sigma.reshape(-1)[0]).abs().argmin() + 1]

    d = perceptual_guidance(setup.edit_model.denoiser, setup.decode, setup.loss, cfg, next_sigma=next_sigma)
    x = setup.x_T / 7
    guided = euler_sample(d, x, sigmas[:2])
    plain = euler_sample(setup.edit_model.denoiser, x, sigmas[:2])
    moved = (guided - plain).pow(2).mean().sqrt().item()
    want = 0.2 * {"noise": 0.5, "x0": 0.25, "latent": 1.0}[target]  # RMS of delta is 0.2 (normalized)
    assert moved == pytest.approx(want, rel=1e-3), (moved, want)
    last = euler_sample(d, x, sigmas[1:]) - euler_sample(setup.edit_model.denoiser, x, sigmas[1:])
    # the final step to sigma 0: noise moves 1.5 * 0.2, x0 and latent all of delta (0.2)
    assert last.pow(2).mean().sqrt().item() == pytest.approx(0.2 * (1.5 if target == "noise" else 1.0), rel=1e-3)


def test_latent_target_needs_the_next_sigma(setup):
    with pytest.raises(ValueError, match="next_sigma"):
        perceptual_guidance(setup.edit_model.denoiser, setup.decode, setup.loss,
                            PerceptualGuidanceConfig(scale=0.2, target="latent"))


def test_plain_step_does_not_shrink_with_the_image_size():
    """LPIPS-like losses are spatial means, so d L / d latent falls as 1 / N; plain mode multiplies by N."""
    g = torch.Generator().manual_seed(9)
    sizes = {}
    for n in (8, 64):
        z = torch.randn(1, 4, n, n, generator=g)
        src = torch.randn(1, 3, 4 * n, 4 * n, generator=g)
        weight = torch.randn(3, 4, 1, 1, generator=g)

        def decode(latent, weight=weight):
            return torch.nn.functional.interpolate(torch.nn.functional.conv2d(latent, weight), scale_factor=4)

        def loss(image, src=src):
            return (image - src).pow(2).flatten(1).mean(1)

        seen = []
        d = perceptual_guidance(lambda x, s: x, decode, loss, PerceptualGuidanceConfig(scale=1.0, target="x0"),
                                on_step=seen.append)
        delta = z - d(z, torch.tensor([1.0]))
        sizes[n] = (delta.pow(2).mean().sqrt().item(), seen[0]["grad_rms"].item())
    (d8, g8), (d64, g64) = sizes[8], sizes[64]
    assert g64 < g8 / 30  # the raw gradient shrinks with the size (64x more elements)
    assert 0.5 < d64 / d8 < 2.0, sizes  # the plain step does not
