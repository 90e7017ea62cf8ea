import pytest
import torch

from psedit_core.analytic import EmbeddingGaussian
from psedit_core.guidance import cfg
from psedit_core.inversion import ddim_invert, to_eps
from psedit_core.nulltext import negative_prompt_inversion, null_text_inversion

W = 7.5


def karras(n: int, sigma_min=0.0292, sigma_max=14.6146, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


@pytest.fixture(scope="module")
def scene():
    g = torch.Generator().manual_seed(0)
    k = 16
    model = EmbeddingGaussian(torch.randn(k, 4 * 8 * 8, generator=g) / k**0.5, torch.full((1, 4, 8, 8), 0.7))
    source, null = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    x0 = model.mean(source) + 0.7 * torch.randn(1, 4, 8, 8, generator=g)
    return model, source, null, x0


def sample_cfg(model, x, sigmas, nulls, source, w):
    for i in range(sigmas.numel() - 1):
        s = sigmas[i].reshape(1)
        d = cfg(model.denoiser(x, s, cond=nulls[i]), model.denoiser(x, s, cond=source), w)
        x = x + (sigmas[i + 1] - sigmas[i]) * to_eps(x, s, d)
    return x


def mse(a, b):
    return (a - b).pow(2).mean().item()


@pytest.mark.parametrize("n", [10, 25])
def test_null_text_reconstructs_at_high_guidance(scene, n):
    model, source, null, x0 = scene
    sigmas = karras(n)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    plain = sample_cfg(model, inv.inverted, sigmas, [null] * n, source, W)
    result = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=20,
                                 early_stop=1e-6, lr=0.05)
    nti = sample_cfg(model, inv.inverted, sigmas, result.nulls, source, W)
    assert torch.allclose(nti, result.final, atol=1e-5)
    assert mse(nti, x0) < mse(plain, x0) / 100, (mse(plain, x0), mse(nti, x0))
    # It cannot beat the inversion itself: the sampled w=1 round trip bounds what any null schedule reaches.
    assert mse(nti, x0) < 2 * mse(inv.latents[-1], x0) + 0.05
    assert len(result.nulls) == n and all(t.shape == null.shape for t in result.nulls)


def test_null_text_lands_on_trajectory_each_step(scene):
    model, source, null, x0 = scene
    sigmas = karras(10)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    result = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=50,
                                 early_stop=1e-7, lr=0.05)
    untouched = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=0)
    # The 16-dim embedding cannot move the 256-dim latent exactly onto the target, but it gets close: per-step
    # losses drop from 10-70 (no optimisation, the drift piling up) to below 0.1.
    assert all(r < u / 100 for r, u in zip(result.losses, untouched.losses, strict=True)), result.losses
    assert max(result.losses) < 0.1
    assert all(1 <= it <= 50 for it in result.iterations) and untouched.iterations == (0,) * 10


def test_early_stop_and_inputs_untouched(scene):
    model, source, null, x0 = scene
    sigmas = karras(10)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    before = (source.clone(), null.clone(), [t.clone() for t in inv.latents])
    loose = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=50,
                                early_stop=1e3, lr=0.05)
    assert loose.iterations == (1,) * 10  # a threshold every loss is under stops after one iteration
    assert torch.equal(source, before[0]) and torch.equal(null, before[1])
    assert all(torch.equal(a, b) for a, b in zip(inv.latents, before[2], strict=True))


def test_negative_prompt_inversion_is_exact_as_the_inversion(scene):
    model, source, null, x0 = scene
    sigmas = karras(25)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas, refine=10)
    npi = sample_cfg(model, inv.inverted, sigmas, negative_prompt_inversion(source, 25), source, W)
    assert mse(npi, x0) < 1e-8


def test_works_on_a_small_network_under_inference_mode():
    """Any differentiable conditional denoiser: a small random conv net conditioned on an embedding."""
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4 + 8, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3,
                                                                                                    padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def denoiser(x, sigma, cond=None):
        c = cond.reshape(cond.shape[0], -1, 1, 1).expand(-1, -1, *x.shape[-2:])
        scale = (1 + sigma.reshape(-1, 1, 1, 1) ** 2).rsqrt()
        return x * scale**2 + net(torch.cat([x * scale, c], 1)) * 0.1

    source, null = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    sigmas = karras(8)
    with torch.inference_mode():
        inv = ddim_invert(lambda x, s: denoiser(x, s, cond=source), x0, sigmas)
        untouched = null_text_inversion(denoiser, inv.latents, sigmas, source, null, W, inner_steps=0)
        result = null_text_inversion(denoiser, inv.latents, sigmas, source, null, W, inner_steps=30, lr=0.05)
    assert mse(result.final, x0) < mse(untouched.final, x0) / 5, (mse(untouched.final, x0), mse(result.final, x0))


def test_rejects_mismatched_trajectory(scene):
    model, source, null, x0 = scene
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, karras(10))
    with pytest.raises(ValueError, match="invert with these sigmas"):
        null_text_inversion(model.denoiser, inv.latents, karras(12), source, null, W)


def test_more_than_100_steps_complete_and_every_step_updates(scene):
    """The learning rate decays to lr/2 over any step count (the old lr (1 - i/100) was 0 at step 101 and
    negative from 102, where Adam raised)."""
    model, source, null, x0 = scene
    sigmas = karras(150)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    result = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=1,
                                 early_stop=0.0, lr=0.01)
    assert len(result.nulls) == 150
    moved = [(b - a).abs().max().item() for a, b in zip((null, *result.nulls[:-1]), result.nulls, strict=True)]
    assert min(moved) > 1e-4, min(moved)  # measured: every step moves by about lr (Adam's first step), 5e-3 - 1e-2


def test_batch_members_get_their_own_embeddings(scene):
    model, source, null, _ = scene
    g = torch.Generator().manual_seed(5)
    x0 = model.mean(source) + 0.7 * torch.randn(2, 4, 8, 8, generator=g)
    sigmas = karras(10)
    kw = dict(inner_steps=20, early_stop=0.0, lr=0.05)

    def run(x):
        inv = ddim_invert(lambda x_, s: model.denoiser(x_, s, cond=source.expand(x_.shape[0], -1)), x, sigmas)
        return null_text_inversion(model.denoiser, inv.latents, sigmas, source.expand(x.shape[0], -1), null, W, **kw)

    both, alone = run(x0), [run(x0[i:i + 1]) for i in range(2)]
    assert all(t.shape == (2, null.shape[1]) for t in both.nulls)
    # Each image's embeddings and result are those of its own inversion (up to float noise that 200 Adam steps
    # amplify: measured 8e-4 at most), and the two images' embeddings differ (by about 1).
    assert (both.nulls[-1][0] - both.nulls[-1][1]).abs().max() > 0.1
    for i in range(2):
        assert torch.allclose(both.nulls[-1][i], alone[i].nulls[-1][0], atol=5e-3)
        assert mse(both.final[i], alone[i].final[0]) < 1e-3 * mse(both.final[i], x0[i])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_at_512px_size(dtype):
    """A denoiser computed in half precision on a 512-px-sized latent (4 x 64 x 64): every step's embedding
    updates and the result reconstructs much better than no optimisation (a mean-reduced fp16 backward
    underflowed here: per-element gradients of about 1e-9)."""
    g = torch.Generator().manual_seed(3)
    k, shape = 8, (1, 4, 64, 64)
    basis = (torch.randn(k, *shape[1:], generator=g) / k**0.5).to(dtype)

    def denoiser(x, sigma, cond=None):
        s2 = sigma.reshape(-1, 1, 1, 1).to(dtype) ** 2
        mean = torch.einsum("bk,kchw->bchw", cond.to(dtype), basis)
        xh = x.to(dtype)
        return (mean + (xh - mean) * 0.49 / (0.49 + s2)).float()  # a Gaussian's denoiser, in half precision

    source, null = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    x0 = denoiser(torch.randn(shape, generator=g) * 0.7, torch.zeros(1), cond=source)
    sigmas = karras(10)
    inv = ddim_invert(lambda x, s: denoiser(x, s, cond=source), x0, sigmas)
    kw = dict(inner_steps=10, early_stop=0.0, lr=0.05)
    untouched = null_text_inversion(denoiser, inv.latents, sigmas, source, null, W, inner_steps=0)
    result = null_text_inversion(denoiser, inv.latents, sigmas, source, null, W, **kw)
    moved = [(b - a).abs().max().item() for a, b in zip((null, *result.nulls[:-1]), result.nulls, strict=True)]
    assert min(moved) > 1e-3, moved
    errors = (mse(untouched.final, x0), mse(result.final, x0))
    assert errors[1] < errors[0] / 1.5, errors
    dtype_kept = dtype
    dtype = torch.float32  # the same model and optimisation in fp32: half precision must reach the same error
    basis = basis.float()
    reference = null_text_inversion(denoiser, inv.latents, sigmas, source, null, W, **kw)
    assert errors[1] < 1.2 * mse(reference.final, x0), (dtype_kept, errors, mse(reference.final, x0))


def test_early_stop_is_measured_in_the_scaled_latent(scene):
    """Losses are in the unit-variance DDIM latent: the first step's error, at sigma_1 ~ 10, is about
    (1 + sigma_1^2) ~ 100x smaller than in the k-diffusion latent."""
    model, source, null, x0 = scene
    sigmas = karras(10)
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    untouched = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, inner_steps=0)
    x = inv.latents[0]
    s = sigmas[0].reshape(1)
    d = cfg(model.denoiser(x, s, cond=null), model.denoiser(x, s, cond=source), W)
    raw = mse(x + (sigmas[1] - sigmas[0]) * to_eps(x, s, d), inv.latents[1])
    assert untouched.losses[0] == pytest.approx(raw / (1 + sigmas[1].item() ** 2), rel=1e-4)
    with pytest.raises(ValueError, match="early_stop_rule"):
        null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, W, early_stop_rule="never")


def test_learning_rate_schedule_is_the_reference_codes():
    """Mokady et al.'s code: ``Adam(lr=1e-2 * (1. - i / 100.))`` at step i of its 50; PSEdit holds lr / 2 from step 50
    on (the formula would reach 0 at 100). ``relative`` is the earlier rule, lr to lr / 2 over any step count."""
    from psedit_core.nulltext import step_learning_rate

    for n in (10, 20, 50):
        for i in range(n):
            assert step_learning_rate(1e-2, i, n) == pytest.approx(1e-2 * (1.0 - i / 100.0), rel=1e-12)
    assert step_learning_rate(1e-2, 120, 150) == pytest.approx(5e-3)
    assert step_learning_rate(1e-2, 9, 10, "relative") == pytest.approx(1e-2 * (1 - 0.45))
    assert step_learning_rate(1e-2, 9, 10, "reference") == pytest.approx(1e-2 * 0.91)
