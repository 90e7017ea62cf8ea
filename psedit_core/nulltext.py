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

solved with Adam (``inner_steps`` iterations, learning rate ``lr * (1 - i / 100)`` as in the reference code,
stopping early once the loss falls below ``early_stop``), each step warm-started from the previous ``phi``.

Negative-prompt inversion skips the optimisation and sets ``phi_i = C``: then ``D_w = D(x, s, C)`` for every w,
the very denoiser the inversion used, so the round trip is as exact as the inversion itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .guidance import cfg
from .inversion import to_eps

__all__ = ["NullTextResult", "guided_step", "negative_prompt_inversion", "null_text_inversion"]


@dataclass(frozen=True)
class NullTextResult:
    """Per-step null embeddings (``nulls[i]`` for the step from ``sigmas[i]``) and what the optimisation reached.

    ``losses[i]`` is the final per-step loss, ``iterations[i]`` the Adam iterations used, ``final`` the latent the
    guided sampler reaches with these embeddings (compare with ``latents[-1]``).
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
    null: torch.Tensor,
    guidance: float,
    *,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    lr: float = 1e-2,
    callback: Callable[[dict], None] | None = None,
) -> NullTextResult:
    """Optimise one null embedding per step (module docstring).

    Args:
        denoiser: ``D(x, sigma, cond=embedding) -> x0``, differentiable in ``cond``.
        latents: the inversion trajectory in sampling order (:attr:`psedit_core.inversion.Inversion.latents`).
        sigmas: its schedule (sampling order).
        source, null: the source and initial null embeddings (never modified).
        guidance: the CFG scale ``w`` the edit will be sampled with.
        inner_steps: Adam iterations per step at most; ``early_stop``: loss below which a step stops.
        callback: called after each step with ``{"i", "loss", "iterations", "x"}``; may raise to cancel.
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    n = sigmas.numel() - 1
    if len(latents) != n + 1:
        raise ValueError(
            f"the trajectory has {len(latents)} latents but the schedule {n} steps: invert with these sigmas"
        )
    nulls, losses, iterations = [], [], []
    with torch.inference_mode(False), torch.enable_grad():
        x = latents[0].detach().clone()
        sigmas = sigmas.detach().clone()  # an inference tensor cannot be saved for backward
        src = source  # passed through as given: hosts may recognise it by identity; never modified
        phi = null.detach().clone()
        for i in range(n):
            s, s_next = sigmas[i].to(x), sigmas[i + 1].to(x)
            target = latents[i + 1].detach().clone()
            with torch.no_grad():
                d_src = denoiser(x, s * x.new_ones([x.shape[0]]), cond=src)
            phi = phi.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([phi], lr=lr * (1.0 - i / 100.0))
            loss_value, used = float("inf"), 0
            for used in range(1, inner_steps + 1):  # noqa: B007 (used after the loop)
                x_next = guided_step(denoiser, x, s, s_next, phi, d_src, guidance)
                loss = torch.nn.functional.mse_loss(x_next, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
                if loss_value < early_stop:
                    break
            phi = phi.detach()
            with torch.no_grad():
                x = guided_step(denoiser, x, s, s_next, phi, d_src, guidance)
                if inner_steps == 0:
                    loss_value = float(torch.nn.functional.mse_loss(x, target))
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
