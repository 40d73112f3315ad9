"""The discretized Gaussian decoder: normalization, bins as integrals, stable tails, sampling."""
import math

import pytest
import torch
from scipy import integrate

from pdiff.distributions import DiscretizedGaussian, quantize
from pdiff.distributions.discretized import log_diff_ndtr
from tests.stats import assert_within_stderr

EPS = torch.finfo(torch.float64).eps
LEVELS = (2, 17, 256)
# (loc, scale) pairs from benign to extreme: a point mass beyond the last level, a very wide
# Gaussian, a narrow one between two levels, one on a level.
PARAMS = [(0.1, 0.3), (5.0, 1e-3), (-3.0, 10.0), (-5.0, 1e-3), (0.03, 1e-3), (1.0, 0.02),
          (-0.7, 0.05), (0.0, 1.0), (0.5, 100.0)]


def _grid(K):
    return torch.linspace(-1, 1, K)


def _all_levels_log_prob(d, K):
    """log P(x_k) for every level, shape (K,) + batch_shape."""
    levels = _grid(K).reshape((K,) + (1,) * len(d.batch_shape)).expand((K,) + d.batch_shape)
    return d.log_prob(levels)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("K", LEVELS)
def test_probabilities_sum_to_one(K, shape):
    # cycle through PARAMS (the scalar case gets the extreme point mass at loc = 5)
    params = [PARAMS[(i + 1) % len(PARAMS)] for i in range(math.prod(shape))]
    loc = torch.tensor([p[0] for p in params]).reshape(shape)
    scale = torch.tensor([p[1] for p in params]).reshape(shape)
    d = DiscretizedGaussian(loc, scale, K)
    assert d.batch_shape == shape and d.event_shape == ()
    lp = _all_levels_log_prob(d, K)
    assert lp.shape == (K,) + shape
    assert not lp.isnan().any() and (lp <= 0).all()
    total = lp.exp().sum(0)
    # K terms each with relative round-off ~eps.
    assert ((total - 1).abs() <= 4 * K * EPS).all(), total


@pytest.mark.parametrize("K", LEVELS)
@pytest.mark.parametrize("loc, scale", PARAMS)
def test_each_parameter_pair_normalizes(K, loc, scale):
    d = DiscretizedGaussian(torch.tensor(loc), torch.tensor(scale), K)
    lp = _all_levels_log_prob(d, K)
    assert not lp.isnan().any()
    assert abs(torch.logsumexp(lp, 0).item()) <= 4 * K * EPS
    # a point mass beyond an end level sits on that level
    if scale < 0.01 and abs(loc) > 1:
        assert lp[-1 if loc > 0 else 0].item() == pytest.approx(0, abs=1e-12)


def _bin_integral(lo, hi, loc, scale):
    """The N(loc, scale^2) mass on [lo, hi] by adaptive quadrature of the density.

    Beyond 40 standard deviations the density is below exp(-800) (zero in float64), so infinite
    ends are replaced by loc -+ 40 scale and the quadrature sees only finite intervals.
    """
    lo, hi = max(lo, loc - 40 * scale), min(hi, loc + 40 * scale)
    if lo >= hi:
        return 0.0
    pdf = lambda x: math.exp(-0.5 * ((x - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    points = [loc] if lo < loc < hi else None
    value, err = integrate.quad(pdf, lo, hi, points=points, epsabs=0, epsrel=1e-13, limit=200)
    return value


@pytest.mark.parametrize("K", (2, 17, 256))
@pytest.mark.parametrize("loc, scale", [(0.1, 0.3), (-3.0, 10.0), (-0.7, 0.05), (0.97, 0.02),
                                        (0.0, 1.0), (1.3, 0.2)])
def test_log_prob_is_the_integral_over_each_bin(K, loc, scale):
    d = DiscretizedGaussian(torch.tensor(loc), torch.tensor(scale), K)
    levels = _grid(K)
    lp = d.log_prob(levels)
    h = 1 / (K - 1)
    for k, x in enumerate(levels.tolist()):
        lo = -math.inf if k == 0 else x - h
        hi = math.inf if k == K - 1 else x + h
        p = _bin_integral(lo, hi, loc, scale)
        if p < 1e-280:  # the quadrature's answer is no longer meaningful
            assert lp[k].item() < -600
            continue
        # quad's relative accuracy (epsrel 1e-13, checked loosely) against the closed form.
        assert lp[k].item() == pytest.approx(math.log(p), abs=1e-9), (k, x)


def _log_diff_ndtr_mp(a, b):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        a = mpmath.mpf(a) if math.isfinite(a) else (mpmath.ninf if a < 0 else mpmath.inf)
        b = mpmath.mpf(b) if math.isfinite(b) else (mpmath.ninf if b < 0 else mpmath.inf)
        # P(a < Z < b) = P(-b < Z < -a): take the side where neither CDF is near 1, so the
        # 60 digits are not spent on the cancellation of 1 - tiny.
        diff = mpmath.ncdf(-a) - mpmath.ncdf(-b) if a > 0 else mpmath.ncdf(b) - mpmath.ncdf(a)
        return float(mpmath.log(diff))


# Left tail, right tail, straddling 0, one-sided infinite, narrow and wide intervals.
INTERVALS = [(-40.0, -39.9), (-40.0, -38.0), (-10.0, -9.99), (-8.5, -8.0), (-3.0, -1.0),
             (-1.0, 1.0), (-0.01, 0.01), (0.5, 0.6), (1.0, 3.0), (8.0, 8.5), (10.0, 10.01),
             (39.9, 40.0), (38.0, 40.0), (30.0, 30.001), (-math.inf, -30.0), (-math.inf, 0.0),
             (-math.inf, 30.0), (-30.0, math.inf), (0.0, math.inf), (30.0, math.inf),
             (-math.inf, math.inf), (5.0, 5.0 + 1e-6), (-5.0 - 1e-6, -5.0), (-1e-3, 37.0)]


def test_log_diff_ndtr_against_high_precision():
    mpmath = pytest.importorskip("mpmath")
    a = torch.tensor([i[0] for i in INTERVALS])
    b = torch.tensor([i[1] for i in INTERVALS])
    got = log_diff_ndtr(a, b)
    for (lo, hi), value in zip(INTERVALS, got.tolist()):
        ref = _log_diff_ndtr_mp(lo, hi)
        assert math.isfinite(value) and math.isfinite(ref), (lo, hi)
        # log(Phi(hi) - Phi(lo)) = log Phi(hi') + log(1 - exp(d)) with d the difference of two
        # log-CDFs (mirrored so neither is near 0); d carries absolute error ~eps (1 + |log Phi|),
        # which log(1 - exp(d)) divides by |d| (about the interval width in units of the
        # density): that is the round-off bound used here.
        with mpmath.workdps(60):
            mirror = lo > 0
            hi_, lo_ = (-lo, -hi) if mirror else (hi, lo)
            log_hi = float(mpmath.log(mpmath.ncdf(hi_)))
            log_lo = float(mpmath.log(mpmath.ncdf(lo_))) if math.isfinite(lo_) else -math.inf
        d = log_lo - log_hi
        tol = 64 * EPS * (1 + abs(ref) + (1 + abs(log_hi)) / min(1.0, abs(d)))
        assert abs(value - ref) <= tol, (lo, hi, value, ref, tol)


def test_log_diff_ndtr_where_the_naive_form_fails():
    """Phi(b) - Phi(a) rounds to 0 in both tails; the stable form stays finite and correct."""
    a = torch.tensor([10.0, -40.0, 20.0])
    b = torch.tensor([11.0, -39.0, 21.0])
    naive = torch.log(torch.special.ndtr(b) - torch.special.ndtr(a))
    assert torch.isinf(naive).all()
    got = log_diff_ndtr(a, b)
    for value, lo, hi in zip(got.tolist(), a.tolist(), b.tolist()):
        assert value == pytest.approx(_log_diff_ndtr_mp(lo, hi), rel=1e-12)


def test_log_diff_ndtr_symmetry():
    """P(a < Z < b) = P(-b < Z < -a)."""
    a = torch.randn(1000) * 10
    b = a + torch.rand(1000) * 3 + 1e-3
    got, mirrored = log_diff_ndtr(a, b), log_diff_ndtr(-b, -a)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, mirrored, rtol=1e-12, atol=1e-12)


def test_log_prob_gradients_finite_at_edge_levels():
    K = 17
    loc = torch.tensor([0.2, 5.0, -5.0, 0.0], requires_grad=True)
    scale = torch.tensor([0.3, 1e-2, 1e-2, 2.0], requires_grad=True)
    levels = _grid(K)[:, None].expand(K, 4)
    DiscretizedGaussian(loc, scale, K).log_prob(levels).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()
    # the gradient of log_prob agrees with finite differences at moderate parameters
    loc = torch.tensor([0.2, -0.9, 0.0], requires_grad=True)
    scale = torch.tensor([0.3, 0.1, 2.0], requires_grad=True)
    value = torch.tensor([-1.0, 0.125, 1.0])
    assert torch.autograd.gradcheck(
        lambda m, s: DiscretizedGaussian(m, s, K, validate_args=False).log_prob(value),
        (loc, scale))


@pytest.mark.parametrize("K, loc, scale", [(2, 0.3, 0.1), (17, 0.2, 0.5), (17, 5.0, 1e-3),
                                           (256, -0.5, 0.05), (256, 0.9, 0.5)])
def test_samples_on_grid_with_the_right_frequencies(K, loc, scale):
    n = 100_000
    d = DiscretizedGaussian(torch.full((2,), loc), torch.full((2,), scale), K)
    x = d.sample((n,))
    assert x.shape == (n, 2)
    assert d.support.check(x).all()
    k = ((x + 1) * (K - 1) / 2).round()
    assert ((x - (-1 + 2 * k / (K - 1))).abs() <= 4 * EPS).all()
    counts = torch.stack([torch.bincount(k[:, j].long(), minlength=K) for j in range(2)], 1)  # (K, 2)
    p = _all_levels_log_prob(d, K).exp()  # (K, 2)
    expected = n * p
    # Levels with enough expected counts for the normal approximation are checked one by one;
    # the rest are pooled. The pooled check adds 3 counts of slack because a count near 0 has a
    # Poisson, not normal, upper tail (P(Poisson(1) >= 10) ~ 1e-7).
    big = expected >= 20
    assert_within_stderr(counts[big], expected[big], (n * p * (1 - p)).sqrt()[big])
    rest_p = (p * ~big).sum(0)
    rest = (counts * ~big).sum(0)
    assert_within_stderr(rest, n * rest_p, (n * rest_p * (1 - rest_p)).sqrt(), atol=3)


def test_mean_matches_samples():
    K = 17
    d = DiscretizedGaussian(torch.tensor([0.2, -0.95, 3.0]), torch.tensor([0.4, 0.1, 2.0]), K)
    n = 100_000
    x = d.sample((n,))
    assert_within_stderr(x.mean(0), d.mean, x.std(0) / n**0.5)


@pytest.mark.parametrize("K", LEVELS)
def test_validation_refuses_off_grid_values(K):
    d = DiscretizedGaussian(torch.zeros(3), torch.ones(3), K)
    h = 1 / (K - 1)
    for bad in (-1 + 0.5 * h, 0.3 * h + 1 - 2 * h, 1 + 2 * h, -1 - 2 * h, math.nan):
        with pytest.raises(ValueError):
            d.log_prob(torch.full((3,), bad))
    d.log_prob(_grid(K)[torch.tensor([0, K // 2, K - 1])])  # on-grid values pass


@pytest.mark.parametrize("K", (1, 0, -2, 2.0, 17.0, None))
def test_num_levels_refused(K):
    with pytest.raises(ValueError, match="num_levels"):
        DiscretizedGaussian(torch.zeros(2), torch.ones(2), K)


def test_scale_must_be_positive():
    with pytest.raises(ValueError):
        DiscretizedGaussian(torch.zeros(2), torch.tensor([1.0, 0.0]), 17)


@pytest.mark.parametrize("K", LEVELS)
def test_quantize(K):
    x = torch.randn(1000) * 2
    q = quantize(x, K)
    grid = _grid(K)
    nearest = grid[(x.clamp(-1, 1)[:, None] - grid).abs().argmin(1)]
    torch.testing.assert_close(q, nearest, rtol=0, atol=4 * EPS)
    torch.testing.assert_close(quantize(q, K), q, rtol=0, atol=4 * EPS)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_expand_and_to_event(shape):
    d = DiscretizedGaussian(torch.tensor(0.1), torch.tensor(0.3), 17)
    big = d.expand(shape)
    assert big.batch_shape == shape and big.sample((5,)).shape == (5,) + shape
    if shape:
        image = DiscretizedGaussian(torch.zeros(shape + (3, 3)), torch.ones(shape + (3, 3)), 17)
        image = image.to_event(2)
        x = image.sample()
        assert image.log_prob(x).shape == shape
