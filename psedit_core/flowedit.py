"""FlowEdit: inversion-free editing of rectified-flow models (Kulikov et al., ICCV 2025), in denoised form.

Notation (code name -> paper / reference code ``FlowEdit_utils.py`` symbol), flow matching (ComfyUI's ``CONST``:
SD3 / SD3.5, Flux, Qwen-Image), model latent space:

    x_src      X_0^src, ``x_src``        the photo's clean latent
    z          Z_t^FE, ``zt_edit``        FlowEdit's edited latent; starts at ``x_src``, ends at the edit
    sigma      t_i, ``t_i``               the step's noise level; ``sigma_next`` = t_{i-1} (``t_im1``), the next one
    eps_k      ``fwd_noise``              the step's k-th standard normal draw, k = 1 .. n_avg (fresh every step)
    D_src      D(x, sigma; src)           denoised prediction with the source caption (CFG at the source scale)
    D_tar      D(x, sigma; tar)           the same with the edit caption (CFG at the edit scale)
    v(x)       V_t                        velocity ``(x - D(x, sigma)) / sigma`` (= eps - x0, what SD3/Flux predict)
    m          -                          edit mask at latent resolution, 1 = where the edit may act
    T, n_max, n_min, n_avg                steps of the schedule, how many of them (from the end) FlowEdit runs,
                                          how many of those (at the end) are plain sampling, draws per step

FlowEdit step (the reference's loop, for the steps i >= T - n_max while T - i > n_min):

    z_src^k = (1 - sigma) x_src + sigma eps_k                                                    (FE1)
    z_tar^k = z + z_src^k - x_src                                                                (FE2)
    V_delta = 1/n_avg sum_k [ v_tar(z_tar^k) - v_src(z_src^k) ]                                  (FE3)
    z      <- z + (sigma_next - sigma) V_delta                                                   (FE4)

The first ``T - n_max`` steps are skipped (``z`` stays the photo); over the last ``n_min`` steps the edit is
finished by plain sampling of the edit caption, started SDEdit-style at the first of them:

    x_tar   = z + (1 - sigma) x_src + sigma eps - x_src                                          (FE6)
    x_tar  <- x_tar + (sigma_next - sigma) v_tar(x_tar)              (every later step too)      (FE7)

What is returned is ``z`` (``n_min = 0``) or ``x_tar``.

A sampler needs a denoised prediction ``D``, from which an Euler step goes ``x + (sigma_next - sigma) (x - D) /
sigma``. That step *is* (FE4) at ``x = z`` for

    D_FE = z - sigma V_delta = x_src + 1/n_avg sum_k [ D_tar(z_tar^k) - D_src(z_src^k) ]          (FE5)

(``z_tar^k - z_src^k = z - x_src`` cancels the latents out of (FE3)). ``D_FE`` is the edited branch's clean estimate:
the photo plus the difference of the two captions' clean estimates of the same noisy copies, which is also ``z``
carried to sigma 0 along ``V_delta``; it is what the sampler previews and what perceptual guidance corrects. At the
first plain step the sampler has to jump from ``z`` to ``x_tar`` as well, so there

    D_hand = z - sigma ( (x_tar - z) / (sigma_next - sigma) + v_tar(x_tar) )                      (FE8)

makes the Euler step land on (FE7) (exact for Euler only); later steps are ``D_tar(x)``.

Edit mask (not in the paper): every step's velocity ``(x - D) / sigma`` is multiplied by ``m``,

    D_m = x - m (x - D)                                                                          (FE9)

so where ``m = 0`` the step is exactly zero and the photo's latent stays as it is, in every phase.

With the same caption (and scale) on both branches ``D_tar(z_tar) = D_src(z_src)`` at ``z = x_src``, so ``D_FE =
x_src`` and no step moves: the output is the photo. Randomness comes in as a ``torch.Generator``
(:func:`draw_noise`): per FlowEdit step ``n_avg`` draws in order, one more at the hand-over (FE6), each a standard
normal tensor of the latent batch's shape drawn in float32 on the CPU (the same numbers on every device).

Reference defaults (``SD3_exp.yaml`` / ``FLUX_exp.yaml``; :data:`PAPER_DEFAULTS`): SD3 T = 50, n_max = 33,
source scale 3.5, edit scale 13.5; Flux.1 dev T = 28, n_max = 24, source guidance 1.5, edit guidance 5.5 (the
distilled guidance input, no null caption); both n_min = 0, n_avg = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masks import fit_mask

__all__ = [
    "PAPER_DEFAULTS",
    "FlowEditPlan",
    "draw_noise",
    "edited_branch",
    "euler_step",
    "flowedit",
    "flowedit_denoised",
    "handover_denoised",
    "latent_mask",
    "masked_denoised",
    "noisy_source",
    "plan_steps",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PAPER_DEFAULTS = {
    "SD3": {"steps": 50, "n_max": 33, "n_min": 0, "n_avg": 1, "source_guidance": 3.5, "edit_guidance": 13.5},
    "Flux": {"steps": 28, "n_max": 24, "n_min": 0, "n_avg": 1, "source_guidance": 1.5, "edit_guidance": 5.5},
}


def _col(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    return sigma


@dataclass(frozen=True)
class FlowEditPlan:
    """Which steps of a ``steps``-step schedule FlowEdit runs: ``n_max`` and ``n_min`` as the reference uses them,
    clamped to the schedule (``n_max >= steps`` runs every step, from the schedule's top)."""

    steps: int
    n_max: int
    n_min: int

    @property
    def start(self) -> int:
        """The first step run (the first ``start`` steps are skipped)."""
        return self.steps - self.n_max

    @property
    def flowedit_steps(self) -> int:
        """How many of the run steps are FlowEdit steps (FE1-FE4); the rest are plain sampling (FE6-FE7)."""
        return self.n_max - self.n_min


def plan_steps(steps: int, n_max: int, n_min: int = 0) -> FlowEditPlan:
    """The :class:`FlowEditPlan` of a schedule of ``steps`` steps; raises (naming the fix) on impossible values."""
    if steps < 1:
        raise ValueError(f"FlowEdit needs a schedule of at least one step, got {steps}")
    if n_max < 0 or n_min < 0:
        raise ValueError(f"n_max and n_min must be >= 0, got n_max={n_max}, n_min={n_min}")
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must not exceed n_max ({n_max}): n_min counts the last of the n_max steps "
                         "that are plain sampling (n_min = n_max is SDEdit)")
    n_max = min(n_max, steps)
    return FlowEditPlan(steps=steps, n_max=n_max, n_min=min(n_min, n_max))


def draw_noise(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw of ``like``'s shape: float32 on the CPU from ``generator``, then moved to ``like``'s
    device and dtype (so a seed gives the same numbers on every device)."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like)


def noisy_source(x_src: torch.Tensor, sigma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """Eq. FE1: ``(1 - sigma) x_src + sigma eps``, the photo noised to ``sigma`` along the flow path."""
    s = _col(sigma, x_src)
    return (1 - s) * x_src + s * eps


def edited_branch(z: torch.Tensor, z_src: torch.Tensor, x_src: torch.Tensor) -> torch.Tensor:
    """Eq. FE2: ``z + z_src - x_src``, computed as ``z_src + (z - x_src)`` (exactly ``z_src`` while ``z`` is the
    photo)."""
    return z_src + (z - x_src)


def flowedit_denoised(x_src: torch.Tensor, differences: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. FE5: ``x_src + mean_k (D_tar(z_tar^k) - D_src(z_src^k))`` from the ``n_avg`` differences."""
    if not differences:
        raise ValueError("FlowEdit needs at least one noise draw per step (n_avg >= 1)")
    total = differences[0]
    for d in differences[1:]:
        total = total + d
    return x_src + total / len(differences)


def handover_denoised(z: torch.Tensor, x_tar: torch.Tensor, d_tar: torch.Tensor, sigma: torch.Tensor | float,
                      sigma_next: torch.Tensor | float) -> torch.Tensor:
    """Eq. FE8: the prediction whose Euler step from ``z`` lands on ``x_tar + (sigma_next - sigma) v_tar(x_tar)``."""
    s, s_next = _col(sigma, z), _col(sigma_next, z)
    dt = s_next - s
    if bool((torch.as_tensor(dt) == 0).any()):
        raise ValueError("the schedule repeats a sigma at FlowEdit's hand-over to plain sampling (n_min): use a "
                         "schedule whose sigmas strictly decrease")
    v_tar = (x_tar - d_tar) / s
    return z - s * ((x_tar - z) / dt + v_tar)


def masked_denoised(x: torch.Tensor, denoised: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. FE9: ``x - m (x - D)``, the step's velocity times the mask (``None``: ``D`` as it is)."""
    if mask is None:
        return denoised
    return x - mask * (x - denoised)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """``x + (sigma_next - sigma) (x - D) / sigma``: ComfyUI's / k-diffusion's Euler step."""
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    return x + (s_next - s) * ((x - denoised) / s)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], ratio: int = 8) -> torch.Tensor:
    """A MASK ``[B, H, W]`` (white = edit) at latent resolution ``[B, 1, h, w]``: placed on the image the latent
    decodes to (``latent_hw * ratio``) as :func:`psedit_core.masks.fit_mask` places it (cropped as VAE encode crops
    the photo, or resized at the same aspect ratio), then each latent pixel gets the mean of its ``ratio x ratio``
    block. A latent pixel is 0 (kept exactly) only where its whole block is outside the mask."""
    h, w = latent_hw
    image_mask = fit_mask(mask, (h * ratio, w * ratio), ratio)
    return F.avg_pool2d(image_mask, ratio) if ratio > 1 else image_mask


def flowedit(
    denoise_src: Denoiser,
    denoise_tar: Denoiser,
    x_src: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    n_max: int,
    n_min: int = 0,
    n_avg: int = 1,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlowEdit over the schedule ``sigmas`` (``T + 1`` values in sampling order, usually ending at 0) as Euler
    steps of the denoised predictions FE5 / FE8 / ``D_tar``, masked by FE9: what a sampler running PSEdit's FlowEdit
    guider computes, and (for ``mask=None``) the reference's loop (module docstring).

    ``denoise_src(x, sigma)`` / ``denoise_tar(x, sigma)`` return the source / edit caption's denoised prediction
    (with its guidance), ``sigma`` a tensor ``[batch]``; ``mask`` (latent resolution, broadcastable) is 1 where the
    edit may act. Returns the edited latent.
    """
    plan = plan_steps(sigmas.numel() - 1, n_max, n_min)
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    x = x_src.clone()
    for i in range(plan.start, plan.steps):
        sigma = sigmas[i] * x.new_ones([x.shape[0]])
        sigma_next = sigmas[i + 1]
        local = i - plan.start
        if local < plan.flowedit_steps:
            differences = []
            for _ in range(n_avg):
                z_src = noisy_source(x_src, sigma, draw_noise(generator, x))
                differences.append(denoise_tar(edited_branch(x, z_src, x_src), sigma) - denoise_src(z_src, sigma))
            denoised = flowedit_denoised(x_src, differences)
        elif local == plan.flowedit_steps:
            x_tar = edited_branch(x, noisy_source(x_src, sigma, draw_noise(generator, x)), x_src)
            denoised = handover_denoised(x, x_tar, denoise_tar(x_tar, sigma), sigma, sigma_next)
        else:
            denoised = denoise_tar(x, sigma)
        x = euler_step(x, masked_denoised(x, denoised, mask), sigma, sigma_next)
    return x
