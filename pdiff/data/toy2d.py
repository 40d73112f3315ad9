"""The standard 2D toys of FFJORD (``lib/toy_data.py``) as distributions with exact densities.

Every toy here has ``batch_shape == ()`` and ``event_shape == (2,)``; ``sample(sample_shape,
generator=None)`` draws i.i.d. points with torch's RNG only, so a seeded ``torch.Generator``
reproduces them. ``log_prob`` is a closed form or a composite Gauss-Legendre quadrature over the
latent curve parameter, in the dtype of its argument. The entropies H quoted in the docstrings
are the Monte Carlo values of the project's reference figures (REFERENCE.md, 400k samples): the
best NLL a model of that toy can reach.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from .mixture import GaussianMixture


class Toy2D(Distribution):
    """Base of the 2D toys: shapes, validation, chunked ``log_prob``; subclasses give
    ``_draw(n, generator) -> (n, 2)`` and ``_log_prob((m, 2)) -> (m,)``."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector
    has_exact_density = True
    chunk_size = 2048  # points per pass, bounding the (points, quadrature nodes) intermediates

    def __init__(self, validate_args: bool | None = None):
        self.dtype = torch.get_default_dtype()
        super().__init__(torch.Size(), torch.Size([2]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != torch.Size():
            raise NotImplementedError(f"{type(self).__name__} supports only an empty batch_shape")
        return self

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            x = self._draw(shape.numel(), generator)  # (n, 2)
        return x.reshape(shape + self.event_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(x)
        flat = x.reshape(-1, 2)
        if not len(flat):
            return x.new_empty(x.shape[:-1])
        out = torch.cat([self._log_prob(chunk) for chunk in flat.split(self.chunk_size)])
        return out.reshape(x.shape[:-1])

    def _rand(self, *shape: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(*shape, dtype=self.dtype, generator=generator)

    def _randn(self, *shape: int, generator: torch.Generator | None) -> Tensor:
        return torch.randn(*shape, dtype=self.dtype, generator=generator)

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def curve_quadrature(speed: Callable[[float], float], lo: float, hi: float, std: float,
                     order: int = 8) -> tuple[Tensor, Tensor]:
    """Nodes and weights (float64) of a composite Gauss-Legendre rule on [lo, hi] for integrals
    over the parameter t of a curve blurred by noise of scale ``std``; ``speed(t) = |dc/dt|``.

    Each panel spans at most 2 std of arc length, and panels shrink geometrically to 0.01 std
    towards both ends, where the integrand for a point beyond the end decays at rate
    distance / std^2. Against a rule 8x finer the log densities of moons, swissroll and 2spirals
    move by < 1e-10 nats on samples and < 1e-6 nats anywhere down to log densities of -500.
    """
    edges = [lo]
    while edges[-1] < hi:
        t = edges[-1]
        arc = min(2 * std, 0.01 * std + 0.5 * speed(t) * min(t - lo, hi - t))
        edges.append(min(t + arc / speed(t), hi))
    x, w = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(order))
    edge = torch.tensor(edges, dtype=torch.float64)
    half, mid = (edge[1:] - edge[:-1]) / 2, (edge[1:] + edge[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).reshape(-1), (half[:, None] * w).reshape(-1)


def _log_normal_mixture(x: Tensor, centres: Tensor, log_w: Tensor, std: float) -> Tensor:
    """log sum_i w_i N(x; c_i, std^2 I) for x (n, 2), centres (m, 2), log_w (m,)."""
    centres, log_w = centres.to(x), log_w.to(x)
    sq = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (n, m)
    return torch.logsumexp(log_w - sq / (2 * std**2), dim=-1) - math.log(2 * math.pi * std**2)


def eight_gaussians() -> GaussianMixture:
    r"""FFJORD's ``8gaussians``: centres 4 (cos k pi/4, sin k pi/4), k = 0..7, std 0.5, equal
    weights, everything divided by 1.414 (not sqrt 2, as in FFJORD). H = 2.833 nats."""
    k = torch.arange(8, dtype=torch.get_default_dtype())
    means = 4.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=-1)
    return GaussianMixture(means=means / 1.414, stds=torch.full((8,), 0.5 / 1.414),
                           weights=torch.ones(8))


class Checkerboard(Toy2D):
    r"""FFJORD's ``checkerboard``: uniform on 8 of the 16 squares of side 2 tiling [-4, 4)^2.

    Generator: x1 ~ U[-2, 2), x2 = U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2), both times 2.

    .. math:: p(x) = \tfrac{1}{32}\,[x \in [-4, 4)^2,\ \lfloor x_1/2 \rfloor + \lfloor x_2/2 \rfloor
              \text{ even}], \qquad H = \log 32 = 3.466 \text{ nats}.
    """

    def _draw(self, n, generator):
        x1 = 4 * self._rand(n, generator=generator) - 2
        flip = torch.randint(2, (n,), generator=generator).to(self.dtype)
        x2 = self._rand(n, generator=generator) - 2 * flip + torch.remainder(torch.floor(x1), 2)
        return 2 * torch.stack([x1, x2], dim=-1)

    def _log_prob(self, x):
        inside = ((x >= -4) & (x < 4)).all(dim=-1)
        black = torch.remainder(torch.floor(x / 2).sum(dim=-1), 2) == 0
        return torch.where(inside & black, -math.log(32.0), -math.inf).to(x)


class NoisyRings(Toy2D):
    r"""Equal-mass circles of radii r_j, uniform angle, plus isotropic N(0, std^2) noise.

    .. math:: p(x) = \frac{1}{J} \sum_j \frac{1}{2\pi\sigma^2}
              \exp\!\Big(-\frac{(|x| - r_j)^2}{2\sigma^2}\Big)\,
              I_0^e\!\Big(\frac{|x| r_j}{\sigma^2}\Big)

    with I_0^e(z) = e^{-z} I_0(z) the scaled Bessel function: averaging the Gaussian over the
    angle gives the von Mises normaliser. See ``circles`` and ``rings`` for FFJORD's two instances.
    """

    def __init__(self, radii: tuple[float, ...], std: float, validate_args: bool | None = None):
        self.radii, self.std = torch.tensor(radii, dtype=torch.float64), std
        super().__init__(validate_args=validate_args)

    def _draw(self, n, generator):
        j = torch.randint(len(self.radii), (n,), generator=generator)
        theta = 2 * math.pi * self._rand(n, generator=generator)
        ring = self.radii.to(self.dtype)[j, None] * torch.stack([theta.cos(), theta.sin()], dim=-1)
        return ring + self.std * self._randn(n, 2, generator=generator)

    def _log_prob(self, x):
        rho, r, var = x.norm(dim=-1, keepdim=True), self.radii.to(x), self.std**2  # (n, 1), (J,)
        log_ring = -(rho - r) ** 2 / (2 * var) + torch.log(torch.special.i0e(rho * r / var))
        return torch.logsumexp(log_ring, dim=-1) - math.log(2 * math.pi * var * len(self.radii))


def circles() -> NoisyRings:
    """FFJORD's ``circles``: sklearn ``make_circles(factor=0.5, noise=0.08)`` times 3, i.e. radii 3
    and 1.5 with equal mass and noise std 0.24 (sklearn's angle grid drawn uniformly here).
    H = 3.268 nats."""
    return NoisyRings(radii=(3.0, 1.5), std=0.08 * 3)


def rings() -> NoisyRings:
    """FFJORD's ``rings``: radii 3, 2.25, 1.5, 0.75 with equal mass, noise std 0.08 (FFJORD's angle
    grid drawn uniformly here). H = 2.621 nats."""
    return NoisyRings(radii=(3.0, 2.25, 1.5, 0.75), std=0.08)


class Moons(Toy2D):
    r"""sklearn's ``make_moons(noise)`` times ``scale`` plus ``shift``; the defaults are FFJORD's
    ``moons`` (scale 2, shift (-1, -0.2), noise 0.1; H = 2.392 nats).

    Generator: theta ~ U[0, pi] (sklearn uses a grid of angles; drawn uniformly here so points are
    i.i.d.), upper moon c_1 = (cos theta, sin theta) or lower moon c_2 = (1 - cos theta,
    0.5 - sin theta) with equal probability, plus N(0, noise^2 I), then scaled and shifted.

    .. math:: p(x) = \frac{1}{2} \sum_{j=1,2} \frac{1}{\pi} \int_0^\pi
              \mathcal{N}(x;\ s\, c_j(\theta) + b,\ s^2 \sigma^2 I)\, d\theta,

    by Gauss-Legendre quadrature (``curve_quadrature``).
    """

    def __init__(self, scale: float = 2.0, shift: tuple[float, float] = (-1.0, -0.2),
                 noise: float = 0.1, validate_args: bool | None = None):
        self.scale, self.shift, self.noise = scale, torch.tensor(shift, dtype=torch.float64), noise
        theta, w = curve_quadrature(lambda t: 1.0, 0.0, math.pi, std=noise)
        upper = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (m, 2)
        lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=-1)
        self._centres = scale * torch.cat([upper, lower]) + self.shift
        self._log_w = torch.log(torch.cat([w, w]) / (2 * math.pi))
        super().__init__(validate_args=validate_args)

    def _draw(self, n, generator):
        theta = math.pi * self._rand(n, generator=generator)
        lower = torch.randint(2, (n, 1), generator=generator).to(torch.bool)
        upper_moon = torch.stack([theta.cos(), theta.sin()], dim=-1)
        lower_moon = torch.tensor([1.0, 0.5], dtype=self.dtype) - upper_moon
        moon = torch.where(lower, lower_moon, upper_moon)
        noisy = moon + self.noise * self._randn(n, 2, generator=generator)
        return self.scale * noisy + self.shift.to(self.dtype)

    def _log_prob(self, x):
        return _log_normal_mixture(x, self._centres, self._log_w, self.scale * self.noise)


def sklearn_moons() -> Moons:
    """Plain sklearn ``make_moons(noise=0.1)``, without FFJORD's rescaling (as in a 2D tutorial)."""
    return Moons(scale=1.0, shift=(0.0, 0.0))


class SwissRoll(Toy2D):
    r"""FFJORD's ``swissroll``: sklearn ``make_swiss_roll(noise=1.0)``, columns 0 and 2, over 5.

    Generator: t = 1.5 pi (1 + 2U), U ~ U[0, 1); x = (t cos t, t sin t) + N(0, I), divided by 5
    (sklearn's height column is dropped, which marginalises it).

    .. math:: p(x) = \frac{1}{3\pi} \int_{3\pi/2}^{9\pi/2}
              \mathcal{N}\big(x;\ (t\cos t, t\sin t)/5,\ 0.2^2 I\big)\, dt,
              \qquad H = 2.670 \text{ nats},

    by Gauss-Legendre quadrature (``curve_quadrature``).
    """

    std = 0.2

    def __init__(self, validate_args: bool | None = None):
        lo, hi = 1.5 * math.pi, 4.5 * math.pi
        t, w = curve_quadrature(lambda t: math.sqrt(1 + t * t) / 5, lo, hi, self.std)
        self._centres = torch.stack([t * t.cos(), t * t.sin()], dim=-1) / 5
        self._log_w = torch.log(w / (hi - lo))
        super().__init__(validate_args=validate_args)

    def _draw(self, n, generator):
        t = 1.5 * math.pi * (1 + 2 * self._rand(n, generator=generator))
        roll = torch.stack([t * t.cos(), t * t.sin()], dim=-1)
        return (roll + self._randn(n, 2, generator=generator)) / 5

    def _log_prob(self, x):
        return _log_normal_mixture(x, self._centres, self._log_w, self.std)


class TwoSpirals(Toy2D):
    r"""FFJORD's ``2spirals``.

    Generator: n = sqrt(U) 540 (2 pi / 360) = 3 pi sqrt(U); a point of the spiral
    c(n) = (-n cos n, n sin n) plus an independent uniform offset 0.5 (U', U'') in [0, 0.5]^2,
    mirrored through the origin with probability 1/2 (FFJORD stacks the two halves), divided by 3,
    plus N(0, 0.1^2 I). So n has density q(n) = 2n / (3 pi)^2 on [0, 3 pi], and given n and the
    sign s the point is uniform on the square of side w = 1/6 centred at m_s(n) = s (c(n)/3 + w/2),
    plus noise; the square convolved with the noise is, in each coordinate, the closed form
    K(v) = (Phi((w/2 - v) / 0.1) - Phi((-w/2 - v) / 0.1)) / w of the distance v to the centre:

    .. math:: p(x) = \frac12 \sum_{s=\pm1} \int_0^{3\pi} q(n) \prod_{d=1,2}
              K\big(|x_d - m_{s,d}(n)|\big)\, dn, \qquad H = 2.648 \text{ nats},

    by Gauss-Legendre quadrature (``curve_quadrature``), skipping nodes that cannot matter.
    """

    std, width = 0.1, 0.5 / 3  # Gaussian noise, and side of the uniform offset after dividing by 3
    skip_nats = 30.0  # nodes this far below the best term are skipped: relative error < m e^-30

    def __init__(self, validate_args: bool | None = None):
        hi = 3 * math.pi
        n, w = curve_quadrature(lambda n: math.sqrt(1 + n * n) / 3, 0.0, hi, self.std)
        centres = torch.stack([-n * n.cos(), n * n.sin()], dim=-1) / 3 + self.width / 2
        self._centres = torch.cat([centres, -centres])  # both signs s
        self._log_w = torch.log(w * n / hi**2).repeat(2)  # q(n) dn / 2
        super().__init__(validate_args=validate_args)

    def _draw(self, n, generator):
        r = 3 * math.pi * self._rand(n, generator=generator).sqrt()
        offset = 0.5 * self._rand(n, 2, generator=generator)
        spiral = torch.stack([-r * r.cos(), r * r.sin()], dim=-1) + offset
        sign = 1 - 2 * torch.randint(2, (n, 1), generator=generator).to(self.dtype)
        return sign * spiral / 3 + self.std * self._randn(n, 2, generator=generator)

    def _log_prob(self, x):
        """Sums only the nodes that can matter. A node whose square lies at distance e from x
        contributes at most w_i Phi(-e / std) / w^2 <= w_i exp(-e^2 / (2 std^2)) / w^2, with
        e >= |x - m_i| - w / sqrt 2: a cheap bound, so the exact terms (log_ndtr) are computed only
        where it comes within ``skip_nats`` of the exact term of the node with the largest bound.
        """
        centres, log_w = self._centres.to(x), self._log_w.to(x)
        gap = (torch.cdist(x, centres) - self.width / math.sqrt(2)).clamp_min(0)  # (n, m)
        bound = log_w - gap**2 / (2 * self.std**2) - 2 * math.log(self.width)
        best = bound.argmax(dim=-1)
        floor = self._log_terms(x, centres[best], log_w[best]) - self.skip_nats  # (n,)
        point, node = torch.nonzero(bound >= floor[:, None], as_tuple=True)
        log_terms = self._log_terms(x[point], centres[node], log_w[node])
        return scatter_logsumexp(log_terms, point, len(x))

    def _log_terms(self, x: Tensor, centres: Tensor, log_w: Tensor) -> Tensor:
        """log(w_i K(v_1) K(v_2)) for matching rows of x and centres."""
        a = (self.width / 2 - (x - centres).abs()) / self.std
        log_k = _log_ndtr_diff(a, a - self.width / self.std).sum(dim=-1)
        return log_w + log_k - 2 * math.log(self.width)


def _log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(a) - Phi(b)) for b < a with b < 0, where Phi(b) / Phi(a) stays away from 1."""
    log_a = torch.special.log_ndtr(a)
    return log_a + torch.log1p(-torch.exp(torch.special.log_ndtr(b) - log_a))


def scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """out[j] = log sum_{i: index[i] = j} exp(values[i]), -inf for an empty sum; shape (size,)."""
    shift = torch.full((size,), -math.inf, dtype=values.dtype, device=values.device).scatter_reduce(
        0, index, values.detach(), "amax").nan_to_num(neginf=0.0)
    total = torch.zeros_like(shift).index_add(0, index, torch.exp(values - shift[index]))
    return shift + total.log()
