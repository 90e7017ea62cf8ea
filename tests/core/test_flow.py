"""The method in the flow-matching parameterisation (SD3 / SD3.5, Flux: ``x = (1 - sigma) x0 + sigma eps``) on
analytic Gaussian models with closed-form answers."""

import pytest
import torch

from psedit_core.analytic import ConditionalFlowGaussian, EmbeddingFlowGaussian, FlowGaussianData, GaussianData
from psedit_core.guidance import distilled_triple_guidance, triple_guidance
from psedit_core.inversion import ddim_invert, euler_sample, flow_input_scale, to_eps
from psedit_core.nulltext import negative_prompt_inversion, null_text_inversion


def flow_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """SD3's schedule: ``sigma(t) = shift t / (1 + (shift - 1) t)`` on a uniform t grid from 1 to 0."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64)
    return FlowGaussianData(mu, s)


@pytest.fixture(scope="module")
def x0(model):
    return model.sample((2, 4, 8, 8), torch.Generator().manual_seed(1))


def rms(a):
    return a.pow(2).mean().sqrt().item()


# --- the oracle -------------------------------------------------------------------------------------------------------

def test_flow_oracle_is_the_ve_model_rescaled(model, x0):
    ve = GaussianData(model.mu, model.s)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=x0.dtype)
    for t in (0.1, 0.5, 0.9):
        x = (1 - t) * x0 + t * noise
        got = model.denoiser(x, torch.tensor([t], dtype=torch.float64))
        assert torch.allclose(got, ve.denoiser(x / (1 - t), t / (1 - t)), atol=1e-12)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert torch.allclose(model.denoiser(noise, one), model.mu.expand_as(noise))  # finite at sigma 1


def test_flow_oracle_tweedie_velocity_and_exact_flow(model, x0):
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=x0.dtype)
    t = 0.6
    x = (1 - t) * x0 + t * noise
    d = model.denoiser(x, torch.tensor([t], dtype=torch.float64))
    # Tweedie for x = a x0 + t eps: E[x0 | x] = (x + t^2 score) / a.
    assert torch.allclose(d, (x + t**2 * model.score(x, t)) / (1 - t), atol=1e-12)
    assert torch.allclose(model.velocity(x, t), to_eps(x, t, d), atol=1e-12)
    # The closed-form flow solves dx/dsigma = velocity (central difference) and maps x0 to pure noise at 1.
    h = 1e-5
    dx = (model.flow(x, t, t + h) - model.flow(x, t, t - h)) / (2 * h)
    assert torch.allclose(dx, model.velocity(x, t), atol=1e-7)
    at_one = model.flow(x0, 0.0, 1.0)
    assert abs(at_one.std().item() - 1.0) < 0.15 and torch.allclose(model.flow(at_one, 1.0, 0.0), x0, atol=1e-12)


# --- inversion --------------------------------------------------------------------------------------------------------

def test_inversion_converges_to_the_exact_flow(model, x0):
    errors = []
    for n in (10, 25, 50, 100):
        inv = ddim_invert(model.denoiser, x0, flow_sigmas(n))
        errors.append(rms(inv.inverted - model.flow(x0, 0.0, 1.0)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4


@pytest.mark.parametrize("n", [10, 25, 50])
def test_round_trip_plain_vs_refined(model, x0, n):
    sigmas = flow_sigmas(n)
    assert sigmas[0] == 1.0  # starts from pure noise, as every flow scheduler does
    plain = euler_sample(model.denoiser, ddim_invert(model.denoiser, x0, sigmas).inverted, sigmas)
    refined = euler_sample(model.denoiser, ddim_invert(model.denoiser, x0, sigmas, refine=5).inverted, sigmas)
    assert rms(refined - x0) < rms(plain - x0) / 50, (rms(plain - x0), rms(refined - x0))


def test_target_convention_is_the_same_latent_at_the_target_level(model, x0):
    """A flow model's input is x itself, so the target convention evaluates v(x_{i+1}, sigma_i): scale 1."""
    sigmas = flow_sigmas(10)
    assert flow_input_scale(torch.tensor(0.3), torch.tensor(0.5)) == 1
    seen = []

    def recording(x, sigma, **kw):
        seen.append((x.clone(), float(sigma[0])))
        return model.denoiser(x, sigma)

    inv = ddim_invert(recording, x0, sigmas, convention="target", input_scale=flow_input_scale)
    assert torch.equal(seen[1][0], inv.latents[-2]) and seen[1][1] == pytest.approx(float(sigmas[-3]))
    start = ddim_invert(model.denoiser, x0, sigmas)
    for label, i in (("target", inv), ("start", start)):
        out = euler_sample(model.denoiser, i.inverted, sigmas)
        assert rms(out - x0) < 0.5, label
    refined = ddim_invert(model.denoiser, x0, sigmas, convention="target", input_scale=flow_input_scale, refine=5)
    assert rms(euler_sample(model.denoiser, refined.inverted, sigmas) - x0) < 1e-3


# --- null-text and negative-prompt inversion over tokens and a pooled vector ------------------------------------------

@pytest.fixture(scope="module")
def embedding_model():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(6 * 3, 4 * 4 * 4, generator=g, dtype=torch.float64) * 0.3
    pooled_weight = torch.randn(5, 4 * 4 * 4, generator=g, dtype=torch.float64) * 0.3
    s = 0.5 + torch.rand(1, 4, 4, 4, generator=g, dtype=torch.float64)
    model = EmbeddingFlowGaussian(weight, s, pooled_weight)
    source = (torch.randn(1, 6, 3, generator=g, dtype=torch.float64),
              torch.randn(1, 5, generator=g, dtype=torch.float64))
    null = (torch.zeros(1, 6, 3, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64))
    return model, source, null


def cfg_sample(model, x, sigmas, nulls, source, w):
    for i in range(sigmas.numel() - 1):
        s = sigmas[i] * x.new_ones([x.shape[0]])
        d_src, d_null = model.denoiser(x, s, cond=source), model.denoiser(x, s, cond=nulls[i])
        d = d_null + w * (d_src - d_null)
        x = x + (sigmas[i + 1] - sigmas[i]) * to_eps(x, s, d)
    return x


def test_null_text_optimises_tokens_and_pooled_vector(embedding_model):
    """A conditioning of tokens and a pooled vector (SD3's): null-text inversion optimises both. The pooled vector
    moves the prediction in directions no token embedding reaches (here a separate projection; in SD3 it modulates
    every block), so a null whose pooled part stays fixed cannot follow the source there: negative-prompt
    inversion's exact solution (null = source, both parts) is out of its reach."""
    model, source, null = embedding_model
    sigmas = flow_sigmas(10)
    x0 = FlowGaussianData(model.mean(source), model.s).sample((1, 4, 4, 4), torch.Generator().manual_seed(5))
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas, refine=5)
    plain = cfg_sample(model, inv.inverted, sigmas, [null] * 10, source, 7.5)
    result = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, 7.5, inner_steps=50,
                                 lr=0.05, early_stop=0.0, loss_weight=lambda s: 1.0)
    assert all(isinstance(p, tuple) and len(p) == 2 for p in result.nulls)
    assert all((p[0] - null[0]).abs().max() > 1e-3 and (p[1] - null[1]).abs().max() > 1e-3 for p in result.nulls)
    assert torch.equal(null[0], torch.zeros_like(null[0]))  # inputs untouched
    optimised = cfg_sample(model, inv.inverted, sigmas, result.nulls, source, 7.5)
    assert torch.allclose(optimised, result.final)
    tokens_only = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null[0], 7.5, inner_steps=50,
                                      lr=0.05, early_stop=0.0, loss_weight=lambda s: 1.0)
    nulls_tokens = [(p, null[1]) for p in tokens_only.nulls]
    e_plain, e_both = rms(plain - x0), rms(optimised - x0)
    e_tokens = rms(cfg_sample(model, inv.inverted, sigmas, nulls_tokens, source, 7.5) - x0)
    assert e_both < e_plain / 100 and e_tokens > 10 * e_both, (e_plain, e_tokens, e_both)
    npi = negative_prompt_inversion(source, 10)
    assert rms(cfg_sample(model, inv.inverted, sigmas, npi, source, 7.5) - x0) < 1e-3


def test_loss_weight_is_what_the_early_stop_reads(embedding_model):
    model, source, null = embedding_model
    sigmas = flow_sigmas(4)
    x0 = FlowGaussianData(model.mean(source), model.s).sample((1, 4, 4, 4), torch.Generator().manual_seed(6))
    inv = ddim_invert(lambda x, s: model.denoiser(x, s, cond=source), x0, sigmas)
    flow = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, 7.5, inner_steps=0,
                               loss_weight=lambda s: 1.0)
    vp = null_text_inversion(model.denoiser, inv.latents, sigmas, source, null, 7.5, inner_steps=0)
    for a, b, s in zip(flow.losses, vp.losses, sigmas[1:].tolist(), strict=True):
        assert b == pytest.approx(a / (1 + s**2))


# --- guidance-distilled text guidance (Flux) --------------------------------------------------------------------------

def test_distilled_triple_guidance_is_triple_guidance_with_the_teachers_null(model):
    g = torch.Generator().manual_seed(7)
    mus = tuple(torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    teacher = ConditionalFlowGaussian(mus, model.s)  # 0 null, 1 source, 2 edit
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.7, 0.7], dtype=torch.float64)
    null, src, edit = (teacher.denoiser(x, sigma, cond=c) for c in range(3))

    def distilled(c, guidance):  # what guidance distillation trains the student to output
        return null + guidance * (teacher.denoiser(x, sigma, cond=c) - null)

    for gamma, beta in ((3.5, 1.4), (3.5, 0.0), (3.5, 3.5), (1.0, 2.0)):
        got = distilled_triple_guidance(distilled(1, gamma), distilled(2, gamma), gamma, beta)
        assert torch.allclose(got, triple_guidance(null, src, edit, gamma, beta), atol=1e-12)
    assert torch.equal(distilled_triple_guidance(src, edit, 3.5, 0.0), src)
    assert torch.allclose(distilled_triple_guidance(src, edit, 3.5, 3.5), edit)
    with pytest.raises(ValueError, match="> 0"):
        distilled_triple_guidance(src, edit, 0.0, 1.0)
