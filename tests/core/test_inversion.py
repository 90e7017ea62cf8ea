import pytest
import torch

from psedit_core.analytic import GaussianData
from psedit_core.inversion import ddim_invert, euler_sample


def karras(n: int, sigma_min=0.0292, sigma_max=14.6146, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64)
    return GaussianData(mu, s)


@pytest.fixture(scope="module")
def x0(model):
    return model.sample((2, 4, 8, 8), torch.Generator().manual_seed(1))


def rms(a):
    return a.pow(2).mean().sqrt().item()


def test_inversion_converges_to_exact_flow(model, x0):
    errors = []
    for n in (10, 25, 50, 100):
        sigmas = karras(n)
        exact = model.flow(x0, 0.0, float(sigmas[0]))
        inv = ddim_invert(model.denoiser, x0, sigmas)
        errors.append(rms(inv.inverted - exact) / rms(exact - model.mu))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.02 and errors[-1] < errors[0] / 4  # first-order: 10x steps -> ~10x smaller


def test_trajectory_layout(model, x0):
    sigmas = karras(10)
    inv = ddim_invert(model.denoiser, x0, sigmas, refine=2)
    assert len(inv.latents) == 11 and len(inv.residuals) == 11 and inv.steps == 10
    assert torch.equal(inv.latents[-1], x0)
    # Each latent lies where the exact flow of the previous one would put it, to first order.
    for i in range(10):
        assert inv.latents[i].std() > inv.latents[i + 1].std()
    assert inv.residuals[-1] == 0.0 and all(r > 0 for r in inv.residuals[:-1])


@pytest.mark.parametrize("n", [10, 25, 50])
def test_round_trip_error_shrinks_with_steps_and_refinement(model, x0, n):
    sigmas = karras(n)
    plain = euler_sample(model.denoiser, ddim_invert(model.denoiser, x0, sigmas).inverted, sigmas)
    refined = euler_sample(model.denoiser, ddim_invert(model.denoiser, x0, sigmas, refine=5).inverted, sigmas)
    e_plain, e_ref = rms(plain - x0), rms(refined - x0)
    assert e_ref < e_plain / 50, (e_plain, e_ref)


def test_plain_round_trip_improves_with_steps(model, x0):
    errs = []
    for n in (10, 25, 50):
        sigmas = karras(n)
        errs.append(rms(euler_sample(model.denoiser, ddim_invert(model.denoiser, x0, sigmas).inverted, sigmas) - x0))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < errs[0] / 3


def test_refinement_solves_the_implicit_step(model, x0):
    sigmas = karras(10)
    inv = ddim_invert(model.denoiser, x0, sigmas, refine=30)
    # The exact inverse of an Euler step: stepping latents[i] down once lands on latents[i + 1].
    for i in range(10):
        x = inv.latents[i]
        d = (x - model.denoiser(x, sigmas[i].expand(x.shape[0]))) / sigmas[i]
        assert torch.allclose(x + (sigmas[i + 1] - sigmas[i]) * d, inv.latents[i + 1], atol=1e-9)


def test_callback_can_cancel_and_input_untouched(model, x0):
    seen = []
    original = x0.clone()

    def cb(info):
        seen.append(info["i"])
        if info["i"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ddim_invert(model.denoiser, x0, karras(10), callback=cb)
    assert seen == [0, 1, 2]
    assert torch.equal(x0, original)


def test_rejects_bad_schedules(model, x0):
    with pytest.raises(ValueError, match="sampling order"):
        ddim_invert(model.denoiser, x0, karras(10).flip(0))
    with pytest.raises(ValueError, match="at least 2"):
        ddim_invert(model.denoiser, x0, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="refine"):
        ddim_invert(model.denoiser, x0, karras(10), refine=-1)


def test_target_convention_is_the_ddim_inverse_step_at_the_target_timestep(model, x0):
    """One plain step of convention 'target' is diffusers' / null-text inversion's DDIM inverse step written in
    DDPM scaling: the model reads z = x / sqrt(1 + s_from^2) at the target level s_to, x0 from z at s_from, then
    z_to = sqrt(abar_to) x0 + sqrt(1 - abar_to) eps."""
    sigmas = torch.tensor([3.0, 1.2, 0.0], dtype=torch.float64)
    x1 = x0 + 1.2 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = ddim_invert(model.denoiser, x1, sigmas[:2], convention="target").inverted

    def eps_of_z(z, s):  # what an eps-prediction UNet returns for input z at the timestep of noise level s
        x = z * (1 + s**2) ** 0.5
        return (x - model.denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s

    a_from, a_to = 1 / (1 + 1.2**2), 1 / (1 + 3.0**2)
    z = x1 * a_from**0.5
    eps = eps_of_z(z, 3.0)
    x0_pred = (z - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    z_to = a_to**0.5 * x0_pred + (1 - a_to) ** 0.5 * eps
    assert torch.allclose(got, z_to / a_to**0.5, rtol=1e-10, atol=1e-10)
    start = ddim_invert(model.denoiser, x1, sigmas[:2], convention="start").inverted
    assert (start - got).abs().max() > 1e-3  # the two conventions differ


def test_refine_solves_the_same_step_from_either_convention(model, x0):
    sigmas = karras(10)
    a = ddim_invert(model.denoiser, x0, sigmas, refine=30, convention="start").inverted
    b = ddim_invert(model.denoiser, x0, sigmas, refine=30, convention="target").inverted
    assert rms(a - b) < 1e-6 * rms(a)


def test_unknown_convention_is_refused(model, x0):
    with pytest.raises(ValueError, match="convention must be one of"):
        ddim_invert(model.denoiser, x0, karras(3), convention="end")
