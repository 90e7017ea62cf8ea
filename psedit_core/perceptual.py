"""Tweedie estimates and perceptual (image-space) guidance of a denoiser.

Notation (code name -> symbol):

    x          x_t = x0 + sigma * eps      sampler state (ComfyUI / k-diffusion space)
    z_t        sqrt(abar) * x_t            the same latent in DDPM scaling (the paper's ``z_t``)
    denoised   D(x_t, sigma)               x0 prediction, ``= E[x0 | x_t]`` for the optimal denoiser
    decode     R: latent -> image          differentiable decoder (VAE or TAESD), images NCHW in [0, 1]
    loss       L(image) -> [batch]         e.g. LPIPS against the source photo
    scale      zeta                        guidance step size

Tweedie's formula (exact for the optimal denoiser):

    x0_hat = x_t + sigma^2 * grad log p_sigma(x_t) = x_t - sigma * eps                             (T1)
    x0_hat = (z_t - sqrt(1 - abar) * eps) / sqrt(abar)           (the paper's form, same value)   (T2)

Perceptual guidance (paper sec. 3.2, in the manner of DPS): each guided step estimates x0, decodes it, measures
``L`` against the source image and moves the prediction down the gradient:

    g = d L(R(x0_hat)) / d x0_hat           gradient "x0":   the denoiser's Jacobian taken as the identity
    g = d L(R(D(x_t, sigma))) / d x_t       gradient "full": through the denoiser too, as in DPS (slower)
    u = N * clip(g)                         step "plain": N = latent elements per image, so the step does not
                                            shrink with the image size (LPIPS is a spatial mean: d L / d x ~ 1 / N)
    u = clip(g) / rms(g)                    step "normalized": unit RMS whatever L's magnitude
    eps_guided = eps + scale * u            target "noise", i.e.  D_guided = D - sigma * scale * u
    D_guided   = D - scale * u              target "x0" (default)
    D_guided   = D - sigma / (sigma - sigma_next) * scale * u
                                            target "latent": the step moves x_t itself by scale * u (DPS)

Returning a corrected prediction (rather than editing ``x_t``) steers any sampler. An Euler/DDIM step from
``sigma`` to ``sigma_next`` moves the latent by ``(sigma - sigma_next) * scale * u`` more with target "noise"
(the correction acts like an added drift, in proportion to how far each step goes, fading as sigma falls: the
classifier-guidance / DPS form, which moves ``z_t`` itself), but only by ``(1 - sigma_next / sigma) * scale * u``
with target "x0": 6.5-8.7% of it in the middle of SD1.5's 50-step schedule and all of it on a final step to
sigma 0, so there the last step outweighs a dozen middle ones. Target "latent" compensates that factor, so every
step of the window moves the latent by the same ``scale * u``, as the paper and DPS move ``z_t`` (the step needs
the next noise level, ``next_sigma``). Outside the window, or when the gradient is not
finite, the prediction passes through unchanged (the skip is logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .inversion import Denoiser

__all__ = [
    "TARGETS",
    "PerceptualGuidanceConfig",
    "guidance_delta",
    "lpips_loss",
    "perceptual_guidance",
    "tweedie_x0",
    "tweedie_x0_alpha",
    "tweedie_x0_from_score",
]

log = logging.getLogger(__name__)

GradientMode = Literal["x0", "full"]
StepMode = Literal["plain", "normalized"]
Target = Literal["noise", "x0", "latent"]
TARGETS = ("x0", "noise", "latent")


def _bcast(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


def tweedie_x0(x: torch.Tensor, sigma: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """Eq. (T1) in eps form: ``x0_hat = x - sigma * eps``."""
    return x - _bcast(sigma, x) * eps


def tweedie_x0_from_score(x: torch.Tensor, sigma: torch.Tensor | float, score: torch.Tensor) -> torch.Tensor:
    """Eq. (T1) in score form: ``x0_hat = x + sigma^2 * grad log p_sigma(x)``."""
    return x + _bcast(sigma, x) ** 2 * score


def tweedie_x0_alpha(z_t: torch.Tensor, alpha_bar: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """Eq. (T2), the paper's form: ``x0_hat = (z_t - sqrt(1 - abar) * eps) / sqrt(abar)``."""
    a = _bcast(alpha_bar, z_t)
    a = a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=z_t.dtype, device=z_t.device)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


@dataclass(frozen=True)
class PerceptualGuidanceConfig:
    """Settings of :func:`perceptual_guidance`.

    Attributes:
        scale: step size ``zeta`` (0 disables the guidance).
        gradient: ``"x0"`` (through the decoder only) or ``"full"`` (through the denoiser too).
        step: ``"plain"`` (``scale * N * g``) or ``"normalized"`` (``scale * g / rms(g)``, per sample).
        clip: if set, each sample's gradient is rescaled so its RMS is at most ``clip`` (before the step).
        target: ``"noise"`` (the correction is added to the predicted noise: ``D - sigma * delta``), ``"latent"``
            (each Euler/DDIM step moves the latent by ``delta``: ``D - sigma / (sigma - sigma_next) * delta``) or
            ``"x0"``
            (subtracted from the x0 prediction: ``D - delta``); module docstring.
    """

    scale: float
    gradient: GradientMode = "x0"
    step: StepMode = "plain"
    clip: float | None = None
    target: Target = "x0"

    def __post_init__(self):
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"perceptual guidance scale must be finite and >= 0, got {self.scale}")
        if self.gradient not in ("x0", "full"):
            raise ValueError(f"gradient must be 'x0' or 'full', got {self.gradient!r}")
        if self.step not in ("plain", "normalized"):
            raise ValueError(f"step must be 'plain' or 'normalized', got {self.step!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.clip is not None and not (self.clip > 0):
            raise ValueError(f"clip must be > 0 or None, got {self.clip}")


def _rms(g: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square, shaped to broadcast against ``g``."""
    return g.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *([1] * (g.ndim - 1)))


def guidance_delta(grad: torch.Tensor, config: PerceptualGuidanceConfig) -> torch.Tensor:
    """The correction ``delta = scale * u`` (module docstring), per sample; non-finite samples give 0."""
    finite = torch.isfinite(grad).flatten(1).all(1).reshape(-1, *([1] * (grad.ndim - 1)))
    g = torch.where(finite, grad, torch.zeros_like(grad))
    rms = _rms(g)
    if config.clip is not None:
        g = g * (config.clip / rms.clamp_min(1e-12)).clamp(max=1.0)
        rms = _rms(g)
    if config.step == "normalized":
        g = g / rms.clamp_min(1e-12)
    else:
        g = g * g[0].numel()
    return config.scale * g


def _latent_factor(sigma: torch.Tensor, sigma_next: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigma / (sigma - sigma_next)``: an x0 correction of ``delta`` times this moves an Euler step's latent by
    ``delta`` (1 where the step does not lower the noise)."""
    sigma, sigma_next = _bcast(sigma, like), _bcast(sigma_next, like)
    drop = sigma - sigma_next
    return torch.where(drop > 0, sigma / drop.clamp_min(1e-12), torch.ones_like(drop))


def lpips_loss(model: torch.nn.Module, source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``L(image) = LPIPS(image, source)`` per sample, images NCHW in [0, 1] (mapped to LPIPS's [-1, 1]).

    ``source`` is broadcast over the batch when it holds one image. For a loss restricted to the region outside
    an edit, see :func:`psedit_core.masks.masked_perceptual_loss`.
    """
    with torch.inference_mode(False):  # ordinary tensors, usable by autograd even if made under inference mode
        src = source.detach().float().clone() * 2 - 1

    def loss(image: torch.Tensor) -> torch.Tensor:
        img = image.float() * 2 - 1
        s = src.to(img.device).expand(img.shape[0], -1, -1, -1) if src.shape[0] == 1 else src.to(img.device)
        return model(img, s).flatten(1).mean(1)

    return loss


def perceptual_guidance(
    denoiser: Denoiser,
    decode: Callable[[torch.Tensor], torch.Tensor],
    loss: Callable[[torch.Tensor], torch.Tensor],
    config: PerceptualGuidanceConfig,
    *,
    active: Callable[[torch.Tensor], bool] | None = None,
    on_step: Callable[[dict], None] | None = None,
    next_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Denoiser:
    """Wrap ``denoiser`` so it returns the perceptually guided prediction (module docstring).

    Args:
        denoiser: ``D(x, sigma, **kw) -> x0``. With ``gradient="full"`` it must be differentiable.
        decode: latent (model space) -> image NCHW in [0, 1], differentiable.
        loss: image -> per-sample loss (e.g. :func:`lpips_loss`); lower is closer to the source.
        config: step size, gradient mode, step normalisation and clipping.
        active: ``active(sigma) -> bool``; guidance only where it is true (e.g. a step window).
        on_step: called after each guided evaluation with ``{"sigma", "loss", "grad_rms", "skipped"}``.
        next_sigma: ``next_sigma(sigma) -> sigma_next``, the noise level the sampler's step goes to (target
            "latent" needs it).

    The gradient is taken with autograd switched on explicitly (``inference_mode(False)``, ``enable_grad``), so
    the wrapper works inside a sampler decorated with ``no_grad``; ``decode`` and ``loss`` must hold ordinary
    (non-inference) parameters. Inputs are never modified.
    """

    if config.target == "latent" and next_sigma is None:
        raise ValueError("target 'latent' needs next_sigma (the noise level each step goes to)")

    def guided(x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        if config.scale == 0 or (active is not None and not active(sigma)):
            return denoiser(x, sigma, **kwargs)
        with torch.inference_mode(False), torch.enable_grad():
            if config.gradient == "full":
                x_in = x.detach().clone().requires_grad_(True)
                denoised = denoiser(x_in, sigma.detach().clone(), **kwargs)
                wrt = x_in
            else:
                with torch.no_grad():
                    denoised = denoiser(x, sigma, **kwargs)
                denoised = denoised.detach().clone().requires_grad_(True)
                wrt = denoised
            if not torch.isfinite(denoised).all():
                raise FloatingPointError(
                    f"the denoiser returned NaN/inf at sigma={float(sigma.reshape(-1)[0]):.4g} before perceptual "
                    "guidance ran; run the model in fp32 or bf16 (fp16 overflows on some checkpoints)"
                )
            values = loss(decode(denoised))
            (grad,) = torch.autograd.grad(values.sum(), wrt)
            result = denoised.detach()
            delta = guidance_delta(grad.detach(), config)
            if config.target == "noise":
                delta = delta * _bcast(sigma.detach().to(delta), delta)
            elif config.target == "latent":
                delta = delta * _latent_factor(sigma.detach().to(delta), next_sigma(sigma).to(delta), delta)
        bad = ~torch.isfinite(grad).flatten(1).all(1)
        if bad.any() or not torch.isfinite(values).all():
            log.warning(
                "perceptual guidance skipped for %d of %d samples at sigma=%.4g: the loss or its gradient was not "
                "finite", int(bad.sum()), bad.numel(), float(sigma.reshape(-1)[0]),
            )
            delta = torch.where(
                torch.isfinite(values).reshape(-1, *([1] * (delta.ndim - 1))), delta, torch.zeros_like(delta)
            )
        if on_step is not None:
            on_step({
                "sigma": float(sigma.reshape(-1)[0]),
                "loss": values.detach(),
                "grad_rms": _rms(torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)).flatten(),
                "skipped": bool(bad.any()),
            })
        return result - delta

    return guided
