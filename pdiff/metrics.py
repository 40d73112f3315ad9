r"""Sample-quality distances between two point sets X (n, D) and Y (m, D), torch only.

Each compares the empirical distributions of model samples and data. Pairwise sums are taken
``chunk_size`` rows at a time, so memory grows as chunk_size x m, never n x m: 10k x 10k points fit
easily. Computations run in float64 on the device of X; results are Python floats.

- ``energy_distance``: E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013).
- ``mmd_rbf``: MMD^2 with the Gaussian kernel, bandwidth by the median heuristic (Gretton et al.
  2012).
- ``sliced_wasserstein``: SW_2 over random unit directions (Bonneel et al. 2015).

The first two come as unbiased U-statistics (mean 0 when X and Y are draws of the same
distribution, hence sometimes slightly negative) or, with ``unbiased=False``, as V-statistics
(the distance between the two empirical distributions, never negative).
"""
from __future__ import annotations

from typing import Callable

import torch


def _check(X: torch.Tensor, Y: torch.Tensor, min_points: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if X.dim() != 2 or Y.dim() != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y must have shapes (n, D) and (m, D) with the same D, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    if min(len(X), len(Y)) < min_points:
        raise ValueError(f"X and Y need at least {min_points} points each, got {len(X)} and {len(Y)}")
    return X.to(torch.float64), Y.to(device=X.device, dtype=torch.float64)


def _pair_mean(X: torch.Tensor, Y: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor],
               *, same: bool, unbiased: bool, chunk_size: int) -> torch.Tensor:
    """Mean of kernel(|x_i - y_j|) over all pairs; with ``same`` (Y is X) and ``unbiased``, over
    i != j only: the diagonal contributes n kernel(0), subtracted, and the mean is over n(n - 1)."""
    total = X.new_zeros(())
    for start in range(0, len(X), chunk_size):
        # exact differences rather than the |x|^2 + |y|^2 - 2xy expansion, so |x_i - x_i| = 0
        dist = torch.cdist(X[start:start + chunk_size], Y,
                           compute_mode="donot_use_mm_for_euclid_dist")  # (chunk, m)
        total = total + kernel(dist).sum()
    n, m = len(X), len(Y)
    if same and unbiased:
        return (total - n * kernel(X.new_zeros(()))) / (n * (n - 1))
    return total / (n * m)


def _two_sample(X, Y, kernel, *, unbiased: bool, chunk_size: int) -> float:
    """E k(X, X') + E k(Y, Y') - 2 E k(X, Y)."""
    kw = dict(unbiased=unbiased, chunk_size=chunk_size)
    xx = _pair_mean(X, X, kernel, same=True, **kw)
    yy = _pair_mean(Y, Y, kernel, same=True, **kw)
    xy = _pair_mean(X, Y, kernel, same=False, **kw)
    return (xx + yy - 2 * xy).item()


def energy_distance(X: torch.Tensor, Y: torch.Tensor, *, unbiased: bool = True,
                    chunk_size: int = 1024) -> float:
    r"""The energy distance E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the laws of X and Y.

    |.| is the Euclidean norm. E >= 0 with equality iff the two laws agree; in 1D it equals
    2 \int (F(u) - G(u))^2 du. Estimated with the within-sample means over i != j
    (``unbiased=True``: a U-statistic, expectation exactly E) or over all pairs (a V-statistic).
    It is MMD^2 with the kernel k(x, y) = -|x - y|.
    """
    X, Y = _check(X, Y, min_points=2 if unbiased else 1)
    return _two_sample(X, Y, lambda d: -d, unbiased=unbiased, chunk_size=chunk_size)


def median_bandwidth(X: torch.Tensor, Y: torch.Tensor, *, max_points: int = 1000) -> float:
    """The median of |z_i - z_j| over i < j in the pooled sample Z = (X, Y), from at most
    ``max_points`` evenly strided points of Z (deterministic)."""
    X, Y = _check(X, Y)
    Z = torch.cat([X, Y])
    Z = Z[torch.linspace(0, len(Z) - 1, min(max_points, len(Z)), device=Z.device).long()]
    dist = torch.cdist(Z, Z, compute_mode="donot_use_mm_for_euclid_dist")
    i, j = torch.triu_indices(len(Z), len(Z), offset=1, device=Z.device)
    return dist[i, j].median().item()


def mmd_rbf(X: torch.Tensor, Y: torch.Tensor, *, bandwidth: float | None = None,
            unbiased: bool = True, chunk_size: int = 1024) -> float:
    r"""MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y) with k(x, y) = exp(-|x - y|^2 / (2 h^2)).

    h = ``bandwidth``, or by default the median pairwise distance of the pooled sample
    (``median_bandwidth``). MMD^2 >= 0 with equality iff the laws agree (the Gaussian kernel is
    characteristic). ``unbiased`` as in ``energy_distance``.
    """
    X, Y = _check(X, Y, min_points=2 if unbiased else 1)
    h = median_bandwidth(X, Y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"the bandwidth must be positive, got {h}")
    return _two_sample(X, Y, lambda d: torch.exp(-0.5 * (d / h) ** 2), unbiased=unbiased,
                       chunk_size=chunk_size)


def _wasserstein2_sq_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""W_2^2 between the empirical laws of the columns of x (n, P) and y (m, P), shape (P,).

    W_2^2 = \int_0^1 (F^{-1}(u) - G^{-1}(u))^2 du with the step quantile functions
    F^{-1}(u) = x_(ceil(u n)). Both are constant between consecutive points of the merged grid
    {i/n} U {j/m}, so the integral is an exact finite sum (n = m: the mean of the squared
    differences of the sorted samples). The grid is kept in integer units of 1/(n m).
    """
    x, y = x.sort(0).values, y.sort(0).values
    n, m = len(x), len(y)
    if n == m:
        return ((x - y) ** 2).mean(0)
    ends = torch.cat([torch.arange(1, n + 1, device=x.device) * m,
                      torch.arange(1, m + 1, device=x.device) * n]).unique()  # sorted, last = n m
    widths = torch.diff(ends, prepend=ends.new_zeros(1)).to(x.dtype) / (n * m)
    ix, iy = (ends - 1) // m, (ends - 1) // n  # the quantile index on each interval (.., end]
    return (widths[:, None] * (x[ix] - y[iy]) ** 2).sum(0)


def sliced_wasserstein(X: torch.Tensor, Y: torch.Tensor, *, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    r"""SW_2(X, Y) = (E_theta W_2^2(theta^T X, theta^T Y))^{1/2}, theta uniform on the unit sphere.

    The expectation is a mean over ``num_projections`` random directions (drawn with ``generator``,
    on the CPU), each 1D W_2^2 exact between the projected empirical laws for any n and m (see
    ``_wasserstein2_sq_1d``). In 1D every direction is +-1, so SW_2 is the exact W_2; a shift of Y
    by c gives SW_2 = |c| / sqrt(D) in expectation over directions.
    """
    X, Y = _check(X, Y)
    theta = torch.randn(X.shape[1], num_projections, dtype=torch.float64, generator=generator)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(X.device)  # (D, P)
    return _wasserstein2_sq_1d(X @ theta, Y @ theta).mean().sqrt().item()
