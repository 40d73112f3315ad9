"""Affine rescaling of data, y = scale * (x - shift), with the log-Jacobian that keeps every NLL in
the data's own units: -log p_x(x) = -log p_y(y) - sum_d log scale_d."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution

from .mixture import GaussianMixture

RESCALINGS = ("none", "standardize", "minmax")

# Statistics of distributions without closed-form moments come from this many fixed draws.
_REFERENCE_SAMPLES = 100_000
_REFERENCE_SEED = 12345


@dataclass(frozen=True)
class Rescaling:
    """y = scale * (x - shift), per dimension."""

    shift: torch.Tensor
    scale: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x)) * self.scale.to(x)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.scale.to(y) + self.shift.to(y)

    @property
    def log_abs_det(self) -> float:
        """sum_d log |scale_d|: subtract it from an NLL of y to get the NLL of x."""
        return float(torch.log(self.scale.abs()).sum())

    def mixture(self, m: GaussianMixture) -> GaussianMixture:
        """The image of a Gaussian mixture under this map (still a Gaussian mixture)."""
        s, c = self.scale.to(m.means), self.shift.to(m.means)
        return GaussianMixture((m.means - c) * s, m.stds * s.abs(), m.weights)


def fit_rescaling(name: str, dist: Distribution, dim: int) -> Rescaling:
    """``none``: identity; ``standardize``: zero mean, unit variance per dimension; ``minmax``: the
    range of 100,000 fixed draws mapped to [-1, 1]. Moments are exact for Gaussian mixtures."""
    if name not in RESCALINGS:
        raise ValueError(f"unknown rescaling {name!r}; valid: {', '.join(RESCALINGS)}")
    dtype = torch.float64
    if name == "none":
        return Rescaling(torch.zeros(dim, dtype=dtype), torch.ones(dim, dtype=dtype))
    if name == "standardize" and isinstance(dist, GaussianMixture):
        return Rescaling(dist.mean.to(dtype), dist.variance.to(dtype).rsqrt())
    x = dist.sample((_REFERENCE_SAMPLES,), generator=torch.Generator().manual_seed(_REFERENCE_SEED))
    x = x.to(dtype)
    if name == "standardize":
        return Rescaling(x.mean(0), x.std(0).reciprocal())
    lo, hi = x.min(0).values, x.max(0).values
    return Rescaling((lo + hi) / 2, 2 / (hi - lo))


def check_data(x: torch.Tensor, dim: int, what: str = "data") -> torch.Tensor:
    """``x`` as an (N, dim) float tensor; ``ValueError`` for another shape or non-finite values."""
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise ValueError(f"{what} must have shape (N, {dim}) with N >= 1 for this dataset, got "
                         f"{tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{what} contains non-finite values (NaN or inf) in {int(bad.sum())} rows, "
                         f"first rows {rows}")
    return x
