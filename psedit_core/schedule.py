"""Noise schedules in ComfyUI's (k-diffusion's) sigma parameterisation, and step windows.

Notation (code name -> symbol):

    sigma      sigma_t      noise level; the sampler state is ``x = x0 + sigma * eps``
    alpha_bar  abar_t       DDPM cumulative product; ``z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
    sigmas     [sigma_0 .. sigma_N]   a schedule of N steps; sampling runs it high -> low and usually ends at 0

The two parameterisations describe the same noisy latent up to a scale, ``z_t = x * sqrt(abar_t)``, with

    abar_t = 1 / (1 + sigma_t^2)          sigma_t = sqrt((1 - abar_t) / abar_t)

Step ``i`` of a schedule moves the state from ``sigmas[i]`` to ``sigmas[i + 1]``. A :class:`StepWindow` names a
contiguous range of steps as fractions of the step count (the paper: "text guidance in the first 20 of 50 steps"
is ``StepWindow(0.0, 0.4)``) and is evaluated against the schedule actually being sampled, so it means the same
thing for every sampler and scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "StepWindow",
    "alpha_bar_to_sigma",
    "sigma_to_alpha_bar",
    "step_index",
]


def sigma_to_alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """``abar = 1 / (1 + sigma^2)``."""
    return 1.0 / (1.0 + sigma**2)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor | float:
    """``sigma = sqrt((1 - abar) / abar)``, the inverse of :func:`sigma_to_alpha_bar` on ``(0, 1]``."""
    if isinstance(alpha_bar, torch.Tensor):
        return ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def _as_float(sigma: torch.Tensor | float) -> float:
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 0:
            raise ValueError("sigma is an empty tensor")
        # A batch carries one sigma per sample; samplers give them all the same value.
        return float(sigma.reshape(-1)[0])
    return float(sigma)


_VALUES: dict[tuple, tuple[float, ...]] = {}


def schedule_values(sigmas: torch.Tensor) -> tuple[float, ...]:
    """The schedule as Python floats, read from the device once per schedule tensor rather than on every model
    call (each read of a GPU tensor into Python waits for the GPU). CPU schedules are read directly."""
    flat = sigmas.reshape(-1)
    if flat.device.type == "cpu":
        return tuple(flat.tolist())
    key = (flat.data_ptr(), flat.numel(), str(flat.device), flat.dtype)
    if key not in _VALUES:
        if len(_VALUES) > 16:
            _VALUES.clear()
        _VALUES[key] = tuple(flat.tolist())  # one transfer for the whole schedule
    return _VALUES[key]


def step_index(sigmas: torch.Tensor, sigma: torch.Tensor | float, *, rtol: float = 1e-4) -> int:
    """Index of the step of ``sigmas`` that a model evaluation at ``sigma`` belongs to.

    The schedule may run down (sampling) or up (inversion). A sigma equal to a schedule entry (within ``rtol``)
    maps to that entry's step; where the schedule repeats a value, the first occurrence wins. A sigma strictly
    between two entries (a multi-stage sampler such as Heun or DPM++ 2S) maps to the step whose interval holds it.
    Sigmas outside the schedule clamp to the first or last step. The result lies in ``[0, len(sigmas) - 2]``.
    """
    values = schedule_values(sigmas)
    if len(values) < 2:
        raise ValueError(f"a schedule needs at least 2 sigmas (1 step), got {len(values)}")
    s = _as_float(sigma)
    last_step = len(values) - 2
    for i, v in enumerate(values):
        if abs(v - s) <= rtol * max(abs(v), abs(s)) + 1e-12:
            return min(i, last_step)
    for i in range(len(values) - 1):
        lo, hi = sorted((values[i], values[i + 1]))
        if lo < s < hi:
            return i
    descending = values[0] >= values[-1]
    beyond_start = s > values[0] if descending else s < values[0]
    return 0 if beyond_start else last_step


@dataclass(frozen=True)
class StepWindow:
    """A contiguous range of sampling steps given as fractions of the step count.

    For a schedule of ``n`` steps the window holds the steps ``i`` with
    ``round(start * n) <= i < round(end * n)``. ``StepWindow(0.0, 1.0)`` holds every step.
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"step window bounds must be finite, got start={self.start}, end={self.end}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"step window start={self.start:g}, end={self.end:g} is invalid: "
                "use 0 <= start < end <= 1 (fractions of the steps, e.g. start=0, end=0.4 for the first 40%)"
            )

    def step_range(self, n_steps: int) -> range:
        """The steps of an ``n_steps`` schedule inside the window (possibly empty for very few steps)."""
        if n_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got {n_steps}")
        return range(round(self.start * n_steps), round(self.end * n_steps))

    def check_not_empty(self, n_steps: int) -> range:
        """:meth:`step_range`, raising a ``ValueError`` that names the fix when it holds no step."""
        steps = self.step_range(n_steps)
        if len(steps) == 0:
            raise ValueError(
                f"step window {self.start:g}..{self.end:g} holds no step of a {n_steps}-step schedule: "
                f"widen it to at least {1 / n_steps:.3g} of the steps or sample with more steps"
            )
        return steps

    def mask(self, n_steps: int) -> torch.Tensor:
        """Boolean tensor of length ``n_steps``: which steps the window holds."""
        m = torch.zeros(n_steps, dtype=torch.bool)
        r = self.step_range(n_steps)
        m[r.start : r.stop] = True
        return m

    def contains(self, sigmas: torch.Tensor, sigma: torch.Tensor | float) -> bool:
        """Whether a model evaluation at ``sigma`` while sampling ``sigmas`` falls in the window."""
        n_steps = sigmas.numel() - 1
        return step_index(sigmas, sigma) in self.step_range(n_steps)

    @property
    def is_full(self) -> bool:
        return self.start == 0.0 and self.end == 1.0
