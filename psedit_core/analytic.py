"""Gaussian data models with closed-form optimal denoisers, for tests and benchmarks.

For data ``x0 ~ N(mu, diag(s^2))`` and ``x = x0 + sigma * eps``:

    p_sigma(x)       = N(mu, diag(s^2 + sigma^2))
    D(x, sigma)      = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) * (x - mu)                 (optimal denoiser)
    score            = -(x - mu) / (s^2 + sigma^2)
    dx/dsigma        = (x - D) / sigma = sigma / (s^2 + sigma^2) * (x - mu)               (probability-flow ODE)
    flow(x, a -> b)  = mu + (x - mu) * sqrt((s^2 + b^2) / (s^2 + a^2))                     (its exact solution)

A conditional model gives each condition its own mean (``mus[c]``), so guidance formulas can be checked exactly.

The same data in the flow-matching parameterisation (ComfyUI's ``CONST``: SD3 / SD3.5, Flux), ``sigma in [0, 1]``:

    x                = (1 - sigma) x0 + sigma * eps
    p_sigma(x)       = N(m, diag(v)),    m = (1 - sigma) mu,    v = (1 - sigma)^2 s^2 + sigma^2
    D(x, sigma)      = E[x0 | x] = mu + (1 - sigma) s^2 / v * (x - m)                            (optimal denoiser)
    velocity         = E[eps - x0 | x] = (x - D) / sigma = -mu + (sigma - (1 - sigma) s^2) / v * (x - m)
    flow(x, a -> b)  = m_b + (x - m_a) * sqrt(v_b / v_a)                                         (exact ODE solution)

(the probability-flow ODE of Gaussian marginals keeps ``(x - m) / sqrt(v)`` constant). For ``sigma < 1`` it is the
variance-exploding model above seen through ``x = (1 - sigma) x_ve``, ``sigma_ve = sigma / (1 - sigma)``:
``D(x, sigma) = D_ve(x / (1 - sigma), sigma / (1 - sigma))``; unlike that form it is finite at ``sigma = 1``
(``D = mu``: pure noise says nothing about the sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ConditionalFlowGaussian", "ConditionalGaussian", "EmbeddingFlowGaussian", "EmbeddingGaussian",
           "FlowGaussianData", "GaussianData"]


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


@dataclass(frozen=True)
class FlowGaussianData:
    """``x0 ~ N(mu, diag(s^2))`` in the flow parameterisation ``x = (1 - sigma) x0 + sigma eps`` (module
    docstring); ``mu`` and ``s`` broadcast against latents."""

    mu: torch.Tensor
    s: torch.Tensor

    def _moments(self, sigma, x):
        t = _col(sigma, x)
        return (1 - t) * self.mu, (1 - t) ** 2 * self.s**2 + t**2, t

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        m, v, t = self._moments(sigma, x)
        return self.mu + (1 - t) * self.s**2 / v * (x - m)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``E[eps - x0 | x]``, in closed form (also at ``sigma = 0``, where ``(x - D) / sigma`` is 0/0)."""
        m, v, t = self._moments(sigma, x)
        return -self.mu + (t - (1 - t) * self.s**2) / v * (x - m)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        m, v, _ = self._moments(sigma, x)
        return -(x - m) / v

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        m_a, v_a, _ = self._moments(sigma_from, x)
        m_b, v_b, _ = self._moments(sigma_to, x)
        return m_b + (x - m_a) * torch.sqrt(v_b / v_a)

    def sample(self, shape, generator: torch.Generator) -> torch.Tensor:
        return self.mu + self.s * torch.randn(shape, generator=generator, dtype=self.mu.dtype)


@dataclass(frozen=True)
class ConditionalFlowGaussian:
    """:class:`ConditionalGaussian` in the flow parameterisation: one mean per condition, ``cond=`` an index."""

    mus: tuple[torch.Tensor, ...]
    s: torch.Tensor

    def model(self, cond: int) -> FlowGaussianData:
        return FlowGaussianData(self.mus[cond], self.s)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, cond: int = 0, **_) -> torch.Tensor:
        return self.model(cond).denoiser(x, sigma)


@dataclass(frozen=True)
class EmbeddingFlowGaussian:
    """:class:`EmbeddingGaussian` in the flow parameterisation: ``mu(c) = reshape(c @ W)``, differentiable in ``c``.

    ``cond`` may also be a tuple ``(tokens, pooled)`` (a conditioning with a pooled vector, as SD3's); the mean is
    then ``reshape(tokens @ W + pooled @ W_pooled)``, so null-text inversion over both can be checked exactly.
    """

    weight: torch.Tensor  # [embedding_dim, C*H*W]
    s: torch.Tensor
    pooled_weight: torch.Tensor | None = None  # [pooled_dim, C*H*W]

    def mean(self, cond) -> torch.Tensor:
        tokens, pooled = cond if isinstance(cond, tuple) else (cond, None)
        flat = tokens.reshape(tokens.shape[0], -1) @ self.weight
        if pooled is not None:
            if self.pooled_weight is None:
                raise ValueError("this model has no pooled input: pass the token embedding alone")
            flat = flat + pooled.reshape(pooled.shape[0], -1) @ self.pooled_weight
        return flat.reshape(tokens.shape[0], *self.s.shape[1:])

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, **_) -> torch.Tensor:
        return FlowGaussianData(self.mean(cond), self.s).denoiser(x, sigma)
