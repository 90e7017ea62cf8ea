"""Classifier-free and triple-conditioning text guidance (arXiv 2312.06680, eq. 1-2).

Notation (code name -> paper symbol):

    null    e(z_t, E_null)   prediction with the null (empty-prompt or optimised null-text) embedding
    src     e(z_t, E_src)    prediction with the source caption
    edit    e(z_t, E_edi)    prediction with the edit caption
    gamma   gamma            text guidance scale (the usual CFG scale)
    beta    beta             edit guidance scale

Paper, per step:

    noise_cond = e_null + gamma * (e_src - e_null)                       (eq. 1)
    noise_pred = noise_cond + beta * (e_edit - e_src)                    (eq. 2)

(The paper's eq. 4 prints ``e(E_edi) - e(E_edi)``, which is zero; eq. 2 above is the intended form.)

The weights ``(1 - gamma, gamma - beta, beta)`` of ``(null, src, edit)`` sum to one, so the same formula holds for
eps predictions and for denoised (x0) predictions: with ``D = x - sigma * eps``,
``sum_k w_k D_k = x - sigma * sum_k w_k eps_k``. ComfyUI passes denoised predictions around; these functions
accept either.

Reductions (tested):
    * ``gamma = 1, beta = 1``: ``edit`` (the plain edit-prompt prediction, no guidance).
    * ``beta = 0``: ``cfg(null, src, gamma)``, the source branch (reconstruction).
    * ``beta = gamma``: ``cfg(null, edit, gamma)``, plain CFG on the edit prompt.

Guidance-distilled models (Flux.1 dev) make one prediction per step, ``e_g(c)``, with the guidance strength ``g`` an
input of the model, and have no unconditional branch. Guidance distillation trains ``e_g`` to reproduce the
teacher's CFG, ``e_g(c) = e_null + g * (e_c - e_null)``, so the paper's terms with ``gamma = g`` are available
without ``e_null``:

    e_null + g * (e_src - e_null)   = e_g(src)                                       (eq. 1 at gamma = g)
    beta * (e_edit - e_src)         = (beta / g) * (e_g(edit) - e_g(src))            (the null terms cancel)
    noise_pred = e_g(src) + (beta / g) * (e_g(edit) - e_g(src))                      (eq. 2-D)

That is the form ``e_src + b * (e_edit - e_src)`` on the distilled predictions, with ``b = beta / g``: a CFG from
the source to the edit caption of scale ``beta / g``. Its weights ``(1 - b, b)`` sum to one (it holds for x0
predictions too) and it reduces as eq. 1-2 does: ``beta = 0`` gives ``e_g(src)``, the very denoiser DDIM inversion
at guidance ``g`` inverts (reconstruction); ``beta = g`` gives ``e_g(edit)``, plain generation on the edit caption
(the paper's ``beta = gamma``). It equals eq. 1-2 exactly where the distilled model equals its teacher's CFG.
"""

from __future__ import annotations

import torch

__all__ = ["cfg", "distilled_triple_guidance", "triple_guidance", "triple_weights"]


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def triple_weights(gamma: float, beta: float) -> tuple[float, float, float]:
    """The affine weights of ``(null, src, edit)`` in eq. 1-2: ``(1 - gamma, gamma - beta, beta)``."""
    return (1.0 - gamma, gamma - beta, beta)


def triple_guidance(
    null: torch.Tensor, src: torch.Tensor, edit: torch.Tensor, gamma: float, beta: float
) -> torch.Tensor:
    """Eq. 1-2: ``null + gamma * (src - null) + beta * (edit - src)``, on eps or on denoised predictions."""
    return null + gamma * (src - null) + beta * (edit - src)


def distilled_triple_guidance(src: torch.Tensor, edit: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Eq. 2-D: ``src + (beta / gamma) * (edit - src)`` on a guidance-distilled model's predictions at guidance
    ``gamma`` (eps, velocity or denoised), equal to eq. 1-2 with the teacher's null branch (module docstring)."""
    if not gamma > 0:
        raise ValueError(f"the distilled guidance gamma must be > 0, got {gamma}")
    return cfg(src, edit, beta / gamma)
