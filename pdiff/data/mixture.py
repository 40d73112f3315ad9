"""Gaussian mixtures with diagonal covariances: exact densities for toy data.

A mixture stays a mixture under the forward process (x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps),
which is what makes the Bayes-optimal denoiser closed form (see ``pdiff.oracle``).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints


class GaussianMixture(Distribution):
    r"""Mixture of K diagonal Gaussians in D dimensions.

    .. math::
        p(x) = \sum_k w_k \prod_d \mathcal{N}(x_d;\ \mu_{kd}, \sigma_{kd}^2)

    Args:
        means: component means, shape ``(K, D)``.
        stds: component standard deviations, shape ``(K,)`` (isotropic) or ``(K, D)``.
        weights: non-negative mixture weights, shape ``(K,)``; normalized here.

    ``batch_shape`` is ``()`` and ``event_shape`` is ``(D,)``.
    """

    arg_constraints = {"means": constraints.real, "stds": constraints.positive,
                       "weights": constraints.simplex}
    support = constraints.real_vector

    def __init__(self, means, stds, weights, validate_args=None):
        means = torch.as_tensor(means, dtype=torch.get_default_dtype())
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=means.dtype)
        if stds.dim() == 1:
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D):
            raise ValueError(f"stds must have shape ({K},) or ({K}, {D}), got {tuple(stds.shape)}")
        weights = torch.as_tensor(weights, dtype=means.dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), got {tuple(weights.shape)}")
        if (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.means, self.stds, self.weights = means, stds.contiguous(), weights / weights.sum()
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([D]),
                         validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def mean(self):
        return self.weights @ self.means

    @property
    def variance(self):
        second = self.weights @ (self.stds**2 + self.means**2)
        return second - self.mean**2

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError("GaussianMixture supports only an empty batch_shape")
        return self

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        shape = torch.Size(sample_shape)
        n = shape.numel()
        if n == 0:
            return self.means.new_empty(shape + self.event_shape)
        with torch.no_grad():
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
            eps = torch.randn(n, self.means.shape[1], dtype=self.means.dtype,
                              device=self.means.device, generator=generator)
            x = self.means[k] + self.stds[k] * eps
        return x.reshape(shape + self.event_shape)

    def component_log_prob(self, x, loc_scale: float | torch.Tensor = 1.0,
                           extra_var: float | torch.Tensor = 0.0):
        r"""log w_k + log N(x; a mu_k, a^2 sigma_k^2 + s) for each k, shape ``x.shape[:-1] + (K,)``.

        With ``a = sqrt(alpha_bar)`` and ``s = 1 - alpha_bar`` this is the density of the noised
        mixture q(x_t | k); ``a`` and ``s`` may be tensors broadcasting against ``x.shape[:-1]``.
        """
        a = torch.as_tensor(loc_scale, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(extra_var, dtype=x.dtype, device=x.device)
        a = a.reshape(a.shape + (1, 1)) if a.dim() else a
        s = s.reshape(s.shape + (1, 1)) if s.dim() else s
        var = a**2 * self.stds**2 + s  # (..., K, D)
        diff = x.unsqueeze(-2) - a * self.means  # (..., K, D)
        log_n = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.log(self.weights) + log_n

    def log_prob(self, x):
        if self._validate_args:
            self._validate_sample(x)
        return torch.logsumexp(self.component_log_prob(x), dim=-1)
