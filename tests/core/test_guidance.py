import pytest
import torch

from psedit_core.analytic import ConditionalGaussian, GaussianData
from psedit_core.guidance import cfg, triple_guidance, triple_weights
from psedit_core.inversion import ddim_invert, euler_sample, to_eps

NULL, SRC, EDIT = 0, 1, 2


def karras(n: int, sigma_min=0.0292, sigma_max=14.6146, rho=7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


@pytest.fixture(scope="module")
def cond_model():
    g = torch.Generator().manual_seed(3)
    mus = tuple(torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return ConditionalGaussian(mus, 0.3 + torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64))


def test_hand_values():
    null, src, edit = torch.tensor(0.0), torch.tensor(1.0), torch.tensor(3.0)
    # 0 + 7.5 * (1 - 0) + 2 * (3 - 1) = 11.5
    assert triple_guidance(null, src, edit, 7.5, 2.0).item() == pytest.approx(11.5)
    assert cfg(torch.tensor(1.0), torch.tensor(3.0), 7.5).item() == pytest.approx(16.0)
    assert sum(triple_weights(7.5, 2.0)) == pytest.approx(1.0)
    assert triple_weights(7.5, 2.0) == pytest.approx((-6.5, 5.5, 2.0))


def test_reductions():
    g = torch.Generator().manual_seed(0)
    null, src, edit = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.allclose(triple_guidance(null, src, edit, 1.0, 1.0), edit, atol=1e-6)
    assert torch.allclose(triple_guidance(null, src, edit, 6.0, 0.0), cfg(null, src, 6.0), atol=1e-5)
    assert torch.allclose(triple_guidance(null, src, edit, 6.0, 6.0), cfg(null, edit, 6.0), atol=1e-5)
    assert torch.allclose(triple_guidance(null, src, edit, 0.0, 0.0), null)


def test_eps_and_denoised_forms_agree(cond_model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 3
    sigma = torch.tensor([2.5, 2.5], dtype=torch.float64)
    d = [cond_model.denoiser(x, sigma, cond=c) for c in (NULL, SRC, EDIT)]
    e = [to_eps(x, sigma, di) for di in d]
    guided_d = triple_guidance(*d, 7.5, 3.0)
    guided_e = triple_guidance(*e, 7.5, 3.0)
    assert torch.allclose(guided_d, x - 2.5 * guided_e, atol=1e-10)


def test_triple_guided_sampling_is_the_mixed_gaussian(cond_model):
    """On Gaussians sharing s, an affine mix of denoisers is the denoiser of the mixed mean, so sampling with the
    guided denoiser must equal sampling the Gaussian with mean null + gamma (src - null) + beta (edit - src)."""
    gamma, beta = 4.0, 2.5
    mus = cond_model.mus
    mixed = GaussianData(triple_guidance(mus[NULL], mus[SRC], mus[EDIT], gamma, beta), cond_model.s)

    def guided(x, sigma):
        return triple_guidance(*(cond_model.denoiser(x, sigma, cond=c) for c in (NULL, SRC, EDIT)), gamma, beta)

    sigmas = torch.cat([torch.linspace(10, 0.05, 20, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10
    assert torch.allclose(euler_sample(guided, x_T, sigmas), euler_sample(mixed.denoiser, x_T, sigmas), atol=1e-9)


def test_beta_zero_reconstructs_source_beta_moves_toward_edit(cond_model):
    """Invert a source sample under the source branch (CFG gamma on src); beta=0 gives it back, beta>0 moves it."""
    gamma = 1.0
    src_model = cond_model.model(SRC)
    x0 = src_model.sample((1, 4, 8, 8), torch.Generator().manual_seed(5))
    sigmas = karras(30)
    inv = ddim_invert(src_model.denoiser, x0, sigmas, refine=10)

    def sample(beta):
        def d(x, sigma):
            return triple_guidance(*(cond_model.denoiser(x, sigma, cond=c) for c in (NULL, SRC, EDIT)), gamma, beta)

        return euler_sample(d, inv.inverted, sigmas)

    rec, edited = sample(0.0), sample(1.0)
    assert (rec - x0).abs().max() < 1e-5
    dist_src = (edited - cond_model.mus[SRC]).norm()
    dist_edit = (edited - cond_model.mus[EDIT]).norm()
    assert dist_edit < dist_src
