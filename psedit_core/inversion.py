"""DDIM inversion (and its sampler) over any denoiser ``D(x, sigma) -> x0``.

Notation (code name -> symbol), k-diffusion / ComfyUI convention:

    x          x_sigma        noisy latent, ``x = x0 + sigma * eps`` (model latent space)
    denoised   D(x, sigma)    the model's x0 prediction (Tweedie estimate)
    eps        eps(x, sigma)  ``(x - D(x, sigma)) / sigma``
    sigmas     a schedule in *sampling* order: ``sigmas[0]`` largest, usually ``sigmas[-1] = 0``

Deterministic DDIM (eta = 0) is Euler's method on the probability-flow ODE ``dx/dsigma = eps(x, sigma)``:

    sampling step   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps(x_i, sigma_i)                      (1)

Inversion walks the schedule backwards. Plain DDIM inversion evaluates eps at the point it starts from,

    plain           x_i = x_{i+1} + (sigma_i - sigma_{i+1}) * eps(x_{i+1}, sigma_{i+1})              (2)

which only approximates the inverse of (1) because (1) uses eps at ``x_i``, the point being solved for. The exact
inverse of (1) is the implicit equation

    exact           x_i = x_{i+1} + (sigma_i - sigma_{i+1}) * eps(x_i, sigma_i)                      (3)

solved here by fixed-point iteration started from (2) (``refine`` iterations per step). With enough iterations
sampling with :func:`euler_sample` from the inverted latent reproduces the input up to the fixed-point residual,
instead of up to the O(step^2) drift of (2). Where the step starts at ``sigma = 0`` eps is 0/0, so (2) evaluates
it at the step's target noise level instead (equal to the first iteration of (3)).

The other usual convention (diffusers' ``DDIMInverseScheduler``, null-text inversion and Prompt-to-Prompt's code)
evaluates the prediction at the step's *target* noise level, on the current latent as the model sees it. In the
DDPM scaling ``z = x / sqrt(1 + sigma^2)`` that is ``eps(z_{i+1}, t_i)``; in this space the same model input is
the latent rescaled to the target level, ``x' = x_{i+1} * s``, ``s = sqrt((1 + sigma_i^2) / (1 + sigma_{i+1}^2))``
(``input_scale``; variance-preserving models, eps or v):

    target          x_i = x_{i+1} + (sigma_i - sigma_{i+1}) * eps(s * x_{i+1}, sigma_i)                (4)

It is the first fixed-point iterate of (3) taken from a better point at the same cost (one model call), so it
usually round-trips closer than (2); ``refine`` iterations then solve (3) from it.

Flow matching (ComfyUI's ``CONST`` model sampling: SD3 / SD3.5, Flux). There the sampler state is

    flow            x = (1 - sigma) * x0 + sigma * eps,        sigma in [0, 1]                          (5)

and the model predicts the velocity ``v = dx/dsigma = eps - x0``; ComfyUI returns ``D = x - sigma * v``, the same
Tweedie estimate ``E[x0 | x]`` as above. The code above needs no change: ``to_eps`` then returns
``(x - D) / sigma = v`` (no longer the noise), and (1) is exactly the rectified-flow Euler step
``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)``, so (2)-(3) invert it and refinement solves the same
implicit equation. Only eq. (4)'s rescaling is specific to the parameterisation: a model sees
``c_in(sigma) * x`` (``calculate_input``: ``c_in = 1 / sqrt(1 + sigma^2)`` for eps/v, ``c_in = 1`` for flow),
and "the same model input at the target level" is ``x' = x_{i+1} * c_in(sigma_{i+1}) / c_in(sigma_i)``. A flow
model is fed ``x`` itself, so the same latent at the target level is the latent unchanged, ``s = 1``
(:func:`flow_input_scale`): eq. (4) reads ``x_i = x_{i+1} + (sigma_i - sigma_{i+1}) * v(x_{i+1}, sigma_i)``, the
naive rectified-flow inversion of diffusers' flow-matching pipelines and RF-Inversion. Where the schedule starts
at ``sigma = 1`` (every flow scheduler), the inverted latent is pure-noise level: ``x = eps``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CONVENTIONS", "Denoiser", "Inversion", "ddim_invert", "euler_sample", "flow_input_scale", "to_eps",
           "vp_input_scale"]

CONVENTIONS = ("target", "start")  # where a plain inversion step evaluates the prediction: eq. (4) / eq. (2)

log = logging.getLogger(__name__)

Denoiser = Callable[..., torch.Tensor]
"""``denoiser(x, sigma, **kwargs) -> x0``; ``sigma`` is a tensor of shape ``[batch]``."""


def to_eps(x: torch.Tensor, sigma: torch.Tensor | float, denoised: torch.Tensor) -> torch.Tensor:
    """``eps = (x - D(x, sigma)) / sigma`` (k-diffusion's ``to_d``)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.numel() > 1 else sigma.reshape(())
    return (x - denoised) / sigma


def vp_input_scale(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """``s`` of eq. (4) for variance-preserving models: the same DDPM-scaled latent at ``sigma_to``."""
    return ((1 + sigma_to**2) / (1 + sigma_from**2)).sqrt()


def flow_input_scale(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """``s`` of eq. (4) for flow-matching models (eq. 5): their input is ``x`` itself at every level, so 1."""
    return torch.ones_like(torch.as_tensor(sigma_to))


def _sigma_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.to(device=x.device, dtype=x.dtype).reshape(()) * x.new_ones([x.shape[0]])


@dataclass(frozen=True)
class Inversion:
    """The result of :func:`ddim_invert`.

    ``latents[i]`` is the latent at noise level ``sigmas[i]`` (sampling order): ``latents[0]`` is the inverted
    latent that sampling starts from, ``latents[-1]`` the clean input. ``residuals[i]`` is the relative size of the
    last fixed-point update of the inversion step that produced ``latents[i]`` (0 for plain steps); the last
    entry is 0 (the input itself).
    """

    sigmas: torch.Tensor
    latents: tuple[torch.Tensor, ...]
    residuals: tuple[float, ...]

    @property
    def inverted(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1


def _check_schedule(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas).reshape(-1)
    if sigmas.numel() < 2:
        raise ValueError(f"a schedule needs at least 2 sigmas (1 step), got {sigmas.numel()}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError("sigmas must be finite and non-negative")
    if not (sigmas[:-1] >= sigmas[1:]).all():
        raise ValueError(
            "sigmas must be in sampling order (non-increasing, e.g. from BasicScheduler); "
            "do not flip them for inversion, ddim_invert walks them backwards itself"
        )
    return sigmas


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    refine: int = 0,
    convention: str = "start",
    input_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = vp_input_scale,
    callback: Callable[[dict], None] | None = None,
    extra_args: dict | None = None,
) -> Inversion:
    """Invert ``x0`` (at ``sigmas[-1]``) to the latent at ``sigmas[0]`` that :func:`euler_sample` maps back to it.

    Args:
        denoiser: ``D(x, sigma, **extra_args) -> x0`` (already guided, e.g. CFG on the source prompt).
        x0: the clean latent, in model space.
        sigmas: the schedule that will be *sampled* later, in sampling order (descending).
        refine: fixed-point iterations of eq. (3) per step, started from the plain step.
        convention: the plain step: ``"start"`` evaluates the prediction where the step starts, eq. (2);
            ``"target"`` at the target noise level on the rescaled latent, eq. (4).
        input_scale: ``s(sigma_from, sigma_to)`` of eq. (4) (the default is right for eps/v-prediction models;
            :func:`flow_input_scale` for flow models, eq. 5).
        callback: called after every step with ``{"i", "x", "sigma", "sigma_from", "residual"}``; it may raise
            to cancel (the inversion stops there, nothing is modified).
        extra_args: keyword arguments passed to every denoiser call.

    Returns:
        An :class:`Inversion` holding the whole trajectory in sampling order.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    sigmas = _check_schedule(sigmas).to(x0.device)
    extra_args = extra_args or {}
    n = sigmas.numel() - 1
    x = x0
    latents = [x0]
    residuals = [0.0]
    for step, i in enumerate(range(n - 1, -1, -1)):
        s_from, s_to = sigmas[i + 1], sigmas[i]
        dt = s_to - s_from
        if convention == "target":
            x_eval, s_eval = x * input_scale(s_from, s_to), s_to
        else:
            x_eval, s_eval = x, (s_from if s_from > 0 else s_to)
        d = to_eps(x_eval, s_eval, denoiser(x_eval, _sigma_batch(x, s_eval), **extra_args))
        x_next = x + dt * d
        residual = 0.0
        for _ in range(refine):
            d = to_eps(x_next, s_to, denoiser(x_next, _sigma_batch(x, s_to), **extra_args))
            update = x + dt * d
            residual = float((update - x_next).norm() / update.norm().clamp_min(1e-12))
            x_next = update
        x = x_next
        latents.append(x)
        residuals.append(residual)
        if callback is not None:
            callback({"i": step, "x": x, "sigma": s_to, "sigma_from": s_from, "residual": residual})
    latents.reverse()
    residuals.reverse()
    return Inversion(sigmas=sigmas, latents=tuple(latents), residuals=tuple(residuals))


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callable[[dict], None] | None = None,
    extra_args: dict | None = None,
) -> torch.Tensor:
    """Deterministic DDIM / Euler sampling, eq. (1), from ``x`` at ``sigmas[0]`` down the schedule.

    Equivalent to ComfyUI's ``euler`` (and ``ddim``) sampler with ``DisableNoise``.
    """
    sigmas = _check_schedule(sigmas).to(x.device)
    extra_args = extra_args or {}
    for i in range(sigmas.numel() - 1):
        denoised = denoiser(x, _sigma_batch(x, sigmas[i]), **extra_args)
        x = x + (sigmas[i + 1] - sigmas[i]) * to_eps(x, sigmas[i], denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x
