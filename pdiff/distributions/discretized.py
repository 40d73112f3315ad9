"""The discretized Gaussian decoder over K equally spaced levels in [-1, 1] (Ho et al. eq. 13)."""
from __future__ import annotations

import math

import torch
import pyro.distributions as dist
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all


class _Levels(constraints.Constraint):
    """Values on the grid -1 + 2k/(K-1), k = 0..K-1 (up to rounding)."""

    def __init__(self, num_levels: int):
        self.num_levels = num_levels
        super().__init__()

    def check(self, value):
        k = (value + 1) * (self.num_levels - 1) / 2
        return ((k - k.round()).abs() < 1e-3) & (k.round() >= 0) & (k.round() <= self.num_levels - 1)


def log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails (Phi the standard normal CDF)."""
    # In the right tail use the mirror image Phi(-a) - Phi(-b) so neither term rounds to 1.
    right = a > 0
    hi = torch.where(right, -a, b)
    lo = torch.where(right, -b, a)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    d = log_lo - log_hi  # <= 0
    return log_hi + torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


class DiscretizedGaussian(dist.TorchDistribution):
    r"""A Gaussian N(loc, scale^2) discretized to K levels x_k = -1 + 2k/(K-1) on [-1, 1].

    .. math::
        P(x_k) = \Phi\Big(\frac{x_k + h - \mu}{\sigma}\Big) - \Phi\Big(\frac{x_k - h - \mu}{\sigma}\Big),
        \qquad h = \frac{1}{K - 1},

    with the first bin open to -inf and the last to +inf, so the K probabilities sum to 1 (the
    decoder of Ho et al. eq. 13; K = 256 for 8-bit images, 17 for scikit-learn's digits).
    Elementwise: ``batch_shape`` is the broadcast shape of ``loc`` and ``scale``; use
    ``.to_event(n)`` for images.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __init__(self, loc, scale, num_levels: int, validate_args=None):
        if not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_levels = num_levels
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return _Levels(self.num_levels)

    @property
    def half_width(self) -> float:
        return 1.0 / (self.num_levels - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return DiscretizedGaussian(self.loc.expand(batch_shape), self.scale.expand(batch_shape),
                                   self.num_levels)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        h = self.half_width
        upper = (value + h - self.loc) / self.scale
        lower = (value - h - self.loc) / self.scale
        inf = torch.full_like(upper, math.inf)
        upper = torch.where(value > 1 - h, inf, upper)  # last level: open to +inf
        lower = torch.where(value < -1 + h, -inf, lower)  # first level: open to -inf
        return log_diff_ndtr(lower, upper)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            x = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device)
            return quantize(x, self.num_levels)

    @property
    def mean(self):
        levels = torch.linspace(-1, 1, self.num_levels, dtype=self.loc.dtype, device=self.loc.device)
        probs = self.log_prob(levels.reshape((-1,) + (1,) * self.loc.dim()).expand(
            (self.num_levels,) + self.loc.shape)).exp()
        return (probs * levels.reshape((-1,) + (1,) * self.loc.dim())).sum(0)


def quantize(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Round to the nearest of the K levels on [-1, 1] (values outside go to the end levels)."""
    k = ((x.clamp(-1, 1) + 1) * (num_levels - 1) / 2).round()
    return k * 2 / (num_levels - 1) - 1
