"""Diagonal Gaussians over events: the one building block of q and of p_theta's transitions."""
from __future__ import annotations

import math
import torch
import pyro.distributions as dist
from torch.distributions import constraints, register_kl
from torch.distributions.utils import _sum_rightmost

LOG_2PI = math.log(2 * math.pi)


def _broadcast_shapes(a: torch.Size, b: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` for two shapes, without its cost (it is on every hot path)."""
    if a == b:
        return a
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(i != j and 1 not in (i, j) for i, j in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return torch.Size(max(i, j) if 1 in (i, j) else i for i, j in zip(a, b))


class DiagNormal(dist.TorchDistribution):
    r"""N(mu, diag(sigma^2)) over the last ``event_dims`` dimensions, carried by its log-variance
    v = log sigma^2 (the stable way to hold a learned variance):

    .. math::
        \log p(x) = -\frac12 \sum_i \big[\log 2\pi + v_i + (x_i - \mu_i)^2 e^{-v_i}\big].

    ``loc`` and ``log_variance`` broadcast to ``batch_shape + event_shape`` and are kept as given
    (a per-example variance of shape (N, 1) stays that small). ``variance``, if given, is
    exp(log_variance) already computed. The KL between two of them is registered in closed form.
    """

    arg_constraints = {"loc": constraints.real, "log_variance": constraints.real}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, log_variance: torch.Tensor, event_dims: int, *,
                 variance: torch.Tensor | None = None, validate_args=None):
        self.loc, self.log_variance, self.event_dims = loc, log_variance, event_dims
        self._var, self._precision = variance, None
        shape = _broadcast_shapes(loc.shape, log_variance.shape)
        if len(shape) < event_dims:
            raise ValueError(f"need at least {event_dims} dimensions for {event_dims} event "
                             f"dimensions, got shape {tuple(shape)}")
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)
        if (variance is not None and self._validate_args
                and not constraints.positive.check(variance).all()):
            raise ValueError("Expected parameter variance to be positive, found invalid values")

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, self.event_dims)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagNormal(self.loc.expand(shape), self.log_variance.expand(shape), self.event_dims,
                          validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return self._variance.expand(self.batch_shape + self.event_shape)

    @property
    def _variance(self) -> torch.Tensor:
        """sigma^2 as given (not expanded), computed once."""
        if self._var is None:
            self._var = torch.exp(self.log_variance)
        return self._var

    @property
    def precision(self) -> torch.Tensor:
        """1 / sigma^2 as given (not expanded), computed once: ``log_prob`` and the KL share it."""
        if self._precision is None:
            self._precision = torch.exp(-self.log_variance)
        return self._precision

    @property
    def stddev(self) -> torch.Tensor:
        return torch.exp(0.5 * self.log_variance).expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(0.5 * self.log_variance) * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        d = value - self.loc
        return _sum_rightmost(-0.5 * (d * d * self.precision + self.log_variance + LOG_2PI),
                              self.event_dims)

    def entropy(self) -> torch.Tensor:
        h = 0.5 * (self.log_variance + 1 + LOG_2PI)
        return _sum_rightmost(h.expand(self.batch_shape + self.event_shape), self.event_dims)


@register_kl(DiagNormal, DiagNormal)
def _kl_diag_normal(q: DiagNormal, p: DiagNormal) -> torch.Tensor:
    r"""KL(q || p) = 1/2 sum_i [v_p - v_q - 1 + (sigma_q^2 + (mu_q - mu_p)^2) / sigma_p^2]."""
    if q.event_shape != p.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and "
                         f"{tuple(p.event_shape)}")
    d = q.loc - p.loc
    kl = 0.5 * ((q._variance + d * d) * p.precision + (p.log_variance - q.log_variance) - 1)
    return _sum_rightmost(kl, q.event_dims)


def diag_normal(loc: torch.Tensor, variance: torch.Tensor | None = None, *,
                log_variance: torch.Tensor | None = None, event_dims: int,
                validate_args: bool | None = None) -> DiagNormal:
    """N(loc, diag(variance)) with the last ``event_dims`` dimensions as its event.

    Give either ``variance`` or ``log_variance``. ``batch_shape`` is ``loc.shape[:-event_dims]``;
    ``validate_args`` as in ``torch.distributions`` (None: the global default).
    """
    if (variance is None) == (log_variance is None):
        raise ValueError("give exactly one of variance and log_variance")
    if log_variance is None:
        return DiagNormal(loc, torch.log(variance), event_dims, variance=variance,
                          validate_args=validate_args)
    return DiagNormal(loc, log_variance, event_dims, validate_args=validate_args)


def standard_normal(like: torch.Tensor, event_dims: int) -> DiagNormal:
    """p(x_T) = N(0, I) with the batch and event shape of ``like``."""
    zero = like.new_zeros(())
    return DiagNormal(zero.expand(like.shape), zero, event_dims, validate_args=False)
