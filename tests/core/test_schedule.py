import math

import pytest
import torch

from psedit_core.schedule import StepWindow, alpha_bar_to_sigma, sigma_to_alpha_bar, step_index


def test_sigma_alpha_bar_round_trip():
    sigmas = torch.tensor([0.0292, 0.5, 1.0, 3.0, 14.6146], dtype=torch.float64)
    ab = sigma_to_alpha_bar(sigmas)
    # Hand values: sigma=1 -> abar=1/2; sigma=3 -> abar=1/10.
    assert ab[2].item() == pytest.approx(0.5)
    assert ab[3].item() == pytest.approx(0.1)
    assert torch.allclose(alpha_bar_to_sigma(ab), sigmas, rtol=1e-5)
    assert alpha_bar_to_sigma(0.5) == pytest.approx(1.0)
    assert sigma_to_alpha_bar(0.0) == 1.0


def test_alpha_bar_matches_sd_beta_schedule():
    # SD's scaled-linear betas: abar_999 gives ComfyUI's sigma_max for SD1.x (14.6146).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    assert alpha_bar_to_sigma(abar[-1]).item() == pytest.approx(14.6146, abs=1e-3)
    assert alpha_bar_to_sigma(abar[0]).item() == pytest.approx(0.0292, abs=1e-3)


def test_step_index_exact_between_and_clamped():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in (10.0, 5.0, 2.0, 1.0)] == [0, 1, 2, 3]
    assert step_index(sigmas, torch.tensor([5.0, 5.0])) == 1  # batched sigma
    assert step_index(sigmas, 3.0) == 1  # Heun's second evaluation lies inside step 1
    assert step_index(sigmas, 0.5) == 3
    assert step_index(sigmas, 0.0) == 3  # the final sigma belongs to the last step
    assert step_index(sigmas, 20.0) == 0
    assert step_index(sigmas, 5.0 * (1 + 1e-6)) == 1  # float32 round-off still matches


def test_step_index_ties_and_reversed():
    tied = torch.tensor([10.0, 5.0, 5.0, 0.0])
    assert step_index(tied, 5.0) == 1  # first occurrence wins
    ascending = torch.tensor([0.0, 1.0, 2.0, 5.0])  # an inversion schedule
    assert step_index(ascending, 1.0) == 1
    assert step_index(ascending, 1.5) == 1
    assert step_index(ascending, 5.0) == 2
    assert step_index(ascending, -1.0) == 0
    with pytest.raises(ValueError, match="at least 2"):
        step_index(torch.tensor([1.0]), 1.0)


def test_window_steps_paper_setting():
    # The paper: text optimisation in the first 20 of 50 steps.
    w = StepWindow(0.0, 0.4)
    assert w.step_range(50) == range(0, 20)
    assert w.mask(50).sum().item() == 20
    assert w.mask(10).tolist() == [True] * 4 + [False] * 6
    assert StepWindow(0.5, 1.0).step_range(25) == range(12, 25)
    assert StepWindow().is_full and not w.is_full


def test_window_on_schedule_follows_sigmas():
    sigmas = torch.linspace(10, 0, 11)  # 10 steps
    w = StepWindow(0.2, 0.5)  # steps 2, 3, 4
    active = [w.contains(sigmas, sigmas[i]) for i in range(10)]
    assert active == [False, False, True, True, True, False, False, False, False, False]
    # A midpoint evaluation (second-order sampler) inside step 4 is active, inside step 5 is not.
    assert w.contains(sigmas, (sigmas[4] + sigmas[5]) / 2)
    assert not w.contains(sigmas, (sigmas[5] + sigmas[6]) / 2)


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0.0, 1.5), (math.nan, 1.0)])
def test_window_rejects_bad_bounds(start, end):
    with pytest.raises(ValueError, match="start"):
        StepWindow(start, end)


def test_window_empty_for_few_steps_names_fix():
    w = StepWindow(0.0, 0.04)
    assert len(w.step_range(10)) == 0
    with pytest.raises(ValueError, match="widen it"):
        w.check_not_empty(10)
    assert w.check_not_empty(50) == range(0, 2)
