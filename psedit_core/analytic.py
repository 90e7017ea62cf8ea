"""Gaussian data models with closed-form optimal denoisers, for tests and benchmarks.

For data ``x0 ~ N(mu, diag(s^2))`` and ``x = x0 + sigma * eps``:

    p_sigma(x)       = N(mu, diag(s^2 + sigma^2))
    D(x, sigma)      = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) * (x - mu)                 (optimal denoiser)
    score            = -(x - mu) / (s^2 + sigma^2)
    dx/dsigma        = (x - D) / sigma = sigma / (s^2 + sigma^2) * (x - mu)               (probability-flow ODE)
    flow(x, a -> b)  = mu + (x - mu) * sqrt((s^2 + b^2) / (s^2 + a^2))                     (its exact solution)

A conditional model gives each condition its own mean (``mus[c]``), so guidance formulas can be checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ConditionalGaussian", "EmbeddingGaussian", "GaussianData"]


def _col(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


@dataclass(frozen=True)
class GaussianData:
    """``x0 ~ N(mu, diag(s^2))``; ``mu`` and ``s`` broadcast against latents (e.g. shape ``[1, C, H, W]``)."""

    mu: torch.Tensor
    s: torch.Tensor

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        s2 = self.s**2
        return self.mu + s2 / (s2 + _col(sigma, x) ** 2) * (x - self.mu)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return -(x - self.mu) / (self.s**2 + _col(sigma, x) ** 2)

    def log_density(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        var = self.s**2 + _col(sigma, x) ** 2
        return (-0.5 * (x - self.mu) ** 2 / var - 0.5 * torch.log(2 * torch.pi * var)).flatten(1).sum(1)

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        s2 = self.s**2
        return self.mu + (x - self.mu) * torch.sqrt((s2 + sigma_to**2) / (s2 + sigma_from**2))

    def sample(self, shape, generator: torch.Generator) -> torch.Tensor:
        return self.mu + self.s * torch.randn(shape, generator=generator, dtype=self.mu.dtype)


@dataclass(frozen=True)
class ConditionalGaussian:
    """One :class:`GaussianData` per condition, sharing ``s``; the denoiser takes ``cond=`` an index."""

    mus: tuple[torch.Tensor, ...]
    s: torch.Tensor

    def model(self, cond: int) -> GaussianData:
        return GaussianData(self.mus[cond], self.s)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, cond: int = 0, **_) -> torch.Tensor:
        return self.model(cond).denoiser(x, sigma)


@dataclass(frozen=True)
class EmbeddingGaussian:
    """A Gaussian whose mean is a linear function of a text embedding: ``mu(c) = reshape(c @ W)``.

    ``D(x, sigma, cond=c)`` is differentiable in ``c``, so null-text inversion can be checked on it exactly.
    """

    weight: torch.Tensor  # [embedding_dim, C*H*W]
    s: torch.Tensor  # broadcastable to the latent, e.g. [1, C, H, W]

    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond.reshape(cond.shape[0], -1) @ self.weight).reshape(cond.shape[0], *self.s.shape[1:])

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor = None, **_) -> torch.Tensor:
        return GaussianData(self.mean(cond), self.s).denoiser(x, sigma)
