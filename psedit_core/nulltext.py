"""Null-text inversion (Mokady et al. 2022) and negative-prompt inversion (Miyake et al. 2023).

Notation (code name -> symbol):

    latents[i]   z*_i        DDIM-inversion trajectory at ``sigmas[i]`` (sampling order; ``latents[0]`` = z*_T)
    source       C           source-caption embedding
    null         phi         unconditional ("null-text") embedding; one ``phi_i`` per step after optimisation
    guidance     w           CFG scale used when editing (e.g. 7.5)
    D(x, s, c)               conditional denoiser, x0 prediction

Plain DDIM inversion is exact only for the denoiser it was run with (usually w = 1); sampling the same latent
with CFG at w = 7.5 drifts away from the photo. Null-text inversion keeps the inversion and instead optimises one
null embedding per step so the guided step from the current latent lands on the trajectory's next latent:

    D_w(x, s; phi) = D(x, s, phi) + w * (D(x, s, C) - D(x, s, phi))                                   (CFG)
    step(x; phi)   = x + (s_{i+1} - s_i) * (x - D_w(x, s_i; phi)) / s_i                                (DDIM / Euler)
    phi_i          = argmin_phi || step(zbar_i; phi) - z*_{i+1} ||^2,  zbar_0 = z*_T,  zbar_{i+1} = step(zbar_i; phi_i)

solved with Adam (``inner_steps`` iterations), each step warm-started from the previous ``phi``. Precision and scale
(what keeps it working in fp16/bf16 and at 512-1024 px):

- the loss is measured where Mokady et al. measured it, in the unit-variance DDIM latent
  ``z = x / sqrt(1 + s^2)``: ``L_i = mean (step(zbar_i) - z*_{i+1})^2 / (1 + s_{i+1}^2)``;
- the gradient is taken of the *sum* of squared errors (``L_i`` times the element count, loss in fp32), so the
  per-element gradient does not shrink with the image size: a mean over a 512-px latent's 16k elements
  underflows in an fp16 backward and falls below Adam's eps (1e-8) even in fp32; where a half-precision
  backward overflows instead, the update is skipped and the loss scale lowered 16x (dynamic loss scaling, as
  AMP does); Adam's step does not depend on the gradient's scale otherwise;
- each image of a batch gets its own embedding (the embeddings are independent, so each is optimised exactly
  as if inverted alone); a step stops once every image's ``L_i`` is under the early-stop threshold;
- the learning rate of step ``i`` is the reference code's ``lr (1 - i / 100)`` (``lr_schedule="reference"``, the
  default), held at ``lr / 2`` from step 50 on, where the reference (50 steps) never goes and its formula would
  reach 0 at step 100; ``"relative"`` (PSEdit's earlier rule) decays from ``lr`` to ``lr / 2`` over whatever number
  of steps: it lowers the rate sooner at 10 steps and loses 1.0-1.3 dB of reconstruction there;
- early-stop rules: ``"mokady"``, the reference code's ``early_stop + 2e-5 i`` (looser on later steps), or
  ``"constant"``, ``early_stop`` on every step.

Conditionings with several parts (SD3 / SD3.5: one token sequence holding all three text encoders' outputs, CLIP-L
and CLIP-G side by side and T5-XXL after them, plus a pooled CLIP-L+G vector that modulates every block): ``null``
may be a tuple of tensors, e.g. ``(tokens, pooled)``; every part is optimised (one Adam over all of them) and the
denoiser receives the tuple. Flow-matching models (``x = (1 - s) x0 + s eps``, ``to_eps`` then returns the
velocity) need no other change: the Euler step above is their sampler step, and their latent already has unit
variance, so ``loss_weight`` is 1 there instead of ``1 / (1 + s^2)``.

Negative-prompt inversion skips the optimisation and sets ``phi_i = C``: then ``D_w = D(x, s, C)`` for every w,
the very denoiser the inversion used, so the round trip is as exact as the inversion itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .guidance import cfg
from .inversion import to_eps

__all__ = ["EARLY_STOP_RULES", "NullTextResult", "guided_step", "negative_prompt_inversion", "null_text_inversion"]

EARLY_STOP_RULES = ("mokady", "constant")
LR_SCHEDULES = ("reference", "relative")


def step_learning_rate(lr: float, i: int, n: int, schedule: str = "reference") -> float:
    """Adam's learning rate for step ``i`` of ``n`` (module docstring): ``lr max(1 - i / 100, 1 / 2)`` (reference) or
    ``lr (1 - i / (2 n))`` (relative)."""
    if schedule == "reference":
        return lr * max(1.0 - i / 100.0, 0.5)
    return lr * (1.0 - 0.5 * i / n)


@dataclass(frozen=True)
class NullTextResult:
    """Per-step null embeddings (``nulls[i]`` for the step from ``sigmas[i]``) and what the optimisation reached.

    ``losses[i]`` is the final per-step loss ``L_i`` (the largest in the batch), ``iterations[i]`` the Adam
    iterations used, ``final`` the latent the guided sampler reaches with these embeddings (compare with
    ``latents[-1]``).
    """

    nulls: tuple[torch.Tensor, ...]
    losses: tuple[float, ...]
    iterations: tuple[int, ...]
    final: torch.Tensor


def guided_step(denoiser, x, sigma, sigma_next, null, d_source, guidance):
    """One DDIM / Euler step of CFG with the source prediction ``d_source`` already computed."""
    s = sigma.reshape(()) if isinstance(sigma, torch.Tensor) else torch.tensor(sigma)
    d = cfg(denoiser(x, s * x.new_ones([x.shape[0]]), cond=null), d_source, guidance)
    return x + (sigma_next - s) * to_eps(x, s, d)


def null_text_inversion(
    denoiser: Callable[..., torch.Tensor],
    latents: tuple[torch.Tensor, ...] | list[torch.Tensor],
    sigmas: torch.Tensor,
    source: torch.Tensor,
    null: torch.Tensor | tuple[torch.Tensor, ...],
    guidance: float,
    *,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    lr: float = 1e-2,
    early_stop_rule: str = "mokady",
    lr_schedule: str = "reference",
    loss_weight: Callable[[float], float] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> NullTextResult:
    """Optimise one null embedding per step (module docstring).

    Args:
        denoiser: ``D(x, sigma, cond=embedding) -> x0``, differentiable in ``cond``.
        latents: the inversion trajectory in sampling order (:attr:`psedit_core.inversion.Inversion.latents`).
        sigmas: its schedule (sampling order).
        source, null: the source and initial null embeddings (never modified); ``null`` may be a tuple of tensors
            (e.g. tokens and pooled vector), all optimised; ``nulls`` then holds tuples.
        guidance: the CFG scale ``w`` the edit will be sampled with.
        inner_steps: Adam iterations per step at most; ``early_stop``: loss (``L_i``, scaled space) below which a
            step stops, by ``early_stop_rule`` (module docstring).
        loss_weight: ``w(sigma)``, the squared scale from the sampler's latent at ``sigma`` to the unit-variance
            latent the loss is measured in: ``1 / (1 + sigma^2)`` (the default; eps/v models), 1 for flow models.
        callback: called after each step with ``{"i", "loss", "iterations", "x"}``; may raise to cancel.
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if early_stop_rule not in EARLY_STOP_RULES:
        raise ValueError(f"early_stop_rule must be one of {EARLY_STOP_RULES}, got {early_stop_rule!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    n = sigmas.numel() - 1
    if len(latents) != n + 1:
        raise ValueError(
            f"the trajectory has {len(latents)} latents but the schedule {n} steps: invert with these sigmas"
        )
    nulls, losses, iterations = [], [], []
    with torch.inference_mode(False), torch.enable_grad():
        x = latents[0].detach().clone()
        batch = x.shape[0]
        sigmas = sigmas.detach().clone()  # an inference tensor cannot be saved for backward
        src = source  # passed through as given: hosts may recognise it by identity; never modified
        parts = null if isinstance(null, tuple) else (null,)
        phis = [p.detach().clone() for p in parts]
        phis = [p.expand(batch, *p.shape[1:]).clone() if p.shape[0] == 1 and batch > 1 else p
                for p in phis]  # one embedding per image

        def as_cond(ps):
            return tuple(ps) if isinstance(null, tuple) else ps[0]

        for i in range(n):
            s, s_next = sigmas[i].to(x), sigmas[i + 1].to(x)
            target = latents[i + 1].detach().clone().float()
            # k-diffusion latent -> unit-variance DDIM latent, squared
            scale = loss_weight(float(s_next)) if loss_weight is not None else 1.0 / (1.0 + float(s_next) ** 2)
            threshold = early_stop + (2e-5 * i if early_stop_rule == "mokady" else 0.0)
            with torch.no_grad():
                d_src = denoiser(x, s * x.new_ones([batch]), cond=src)
            phis = [p.detach().clone().requires_grad_(True) for p in phis]
            elements = float(x[0].numel())
            loss_scale = elements  # d/dphi of the per-image sum of squares; lowered if a backward overflows
            opt = torch.optim.Adam(phis, lr=step_learning_rate(lr, i, n, lr_schedule))
            loss_value, used = float("inf"), 0
            for used in range(1, inner_steps + 1):  # noqa: B007 (used after the loop)
                x_next = guided_step(denoiser, x, s, s_next, as_cond(phis), d_src, guidance).float()
                per_image = ((x_next - target).pow(2) * scale).flatten(1).mean(1)
                opt.zero_grad(set_to_none=True)
                (per_image.sum() * loss_scale).backward()
                loss_value = float(per_image.detach().max())
                # a half-precision backward overflowed: as AMP does,
                if not all(torch.isfinite(p.grad).all() for p in phis if p.grad is not None):
                    loss_scale /= 16.0  # skip this update and scale down
                    if loss_scale < 1e-3:
                        raise FloatingPointError(
                            f"null-text inversion: non-finite gradient at step {i} at any loss scale: run the "
                            "model in fp32 or bf16, or use method 'negative-prompt'"
                        )
                    continue
                for p in phis:
                    if p.grad is not None:
                        p.grad.mul_(elements / loss_scale)  # the gradient of the sum of squared errors
                opt.step()
                if loss_value < threshold:
                    break
            phis = [p.detach() for p in phis]
            phi = as_cond(phis)
            with torch.no_grad():
                x = guided_step(denoiser, x, s, s_next, phi, d_src, guidance)
                if inner_steps == 0:
                    loss_value = float(((x.float() - target).pow(2) * scale).flatten(1).mean(1).max())
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"null-text inversion diverged at step {i}: lower the learning rate or the inner iterations"
                )
            nulls.append(phi)
            losses.append(loss_value)
            iterations.append(used if inner_steps else 0)
            if callback is not None:
                callback({"i": i, "loss": loss_value, "iterations": iterations[-1], "x": x})
    return NullTextResult(tuple(nulls), tuple(losses), tuple(iterations), x)


def negative_prompt_inversion(source: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """Miyake et al.: the null embedding of every step is the source embedding (no optimisation)."""
    return tuple(source for _ in range(steps))
