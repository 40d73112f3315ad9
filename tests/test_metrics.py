"""Sample distances: zero in expectation (unbiased forms) for two samples of one law, clearly
positive for different laws, closed forms for Gaussians, exact values for empirical laws."""
import math

import pytest
import torch

from pdiff.metrics import energy_distance, median_bandwidth, mmd_rbf, sliced_wasserstein

from .stats import Z, assert_within_stderr

REPEATS = 20


def _sw(X, Y):
    return sliced_wasserstein(X, Y, num_projections=64, generator=torch.Generator().manual_seed(1))


METRICS = {"energy": energy_distance, "mmd": mmd_rbf, "sliced": _sw}


def _repeated(metric, shift: float, n: int = 200, m: int = 150, dim: int = 2):
    """The metric between n draws of N(0, I) and m draws of N(shift e_1, I), REPEATS times:
    (mean, standard error of the mean)."""
    g = torch.Generator().manual_seed(0)
    offset = torch.zeros(dim)
    offset[0] = shift
    values = torch.tensor([metric(torch.randn(n, dim, generator=g),
                                  torch.randn(m, dim, generator=g) + offset)
                           for _ in range(REPEATS)])
    return values.mean(), values.std() / math.sqrt(REPEATS)


@pytest.mark.parametrize("name", ["energy", "mmd"])
def test_unbiased_forms_have_mean_zero_for_one_law(name):
    mean, stderr = _repeated(METRICS[name], shift=0.0)
    assert_within_stderr(mean, 0.0, stderr)


@pytest.mark.parametrize("name", list(METRICS))
def test_different_laws_are_clearly_apart(name):
    same, se_same = _repeated(METRICS[name], shift=0.0)
    apart, se_apart = _repeated(METRICS[name], shift=1.0)
    assert apart - same > Z * math.hypot(se_same, se_apart)


def _abs_normal_mean(mu: float, sigma: float) -> float:
    """E|W| for W ~ N(mu, sigma^2) (the folded normal mean)."""
    phi = 0.5 * (1 + math.erf(-mu / (sigma * math.sqrt(2))))
    return sigma * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * sigma**2)) + mu * (1 - 2 * phi)


def test_energy_distance_matches_gaussian_closed_form():
    # X - Y ~ N(mu, 2) and X - X' ~ N(0, 2): E = 2 E|N(mu, 2)| - 2 E|N(0, 2)|
    mu = 0.7
    target = 2 * _abs_normal_mean(mu, math.sqrt(2)) - 2 * _abs_normal_mean(0.0, math.sqrt(2))
    mean, stderr = _repeated(energy_distance, shift=mu, dim=1)
    assert_within_stderr(mean, target, stderr)


def test_mmd_matches_gaussian_closed_form():
    # E exp(-|W|^2 / 2h^2) for W ~ N(c, s^2 I_D) is (h^2/(h^2 + s^2))^(D/2) exp(-|c|^2 / 2(h^2 + s^2))
    h, mu, dim = 1.5, 0.8, 2
    scale = (h**2 / (h**2 + 2)) ** (dim / 2)
    target = 2 * scale * (1 - math.exp(-mu**2 / (2 * (h**2 + 2))))
    mean, stderr = _repeated(lambda X, Y: mmd_rbf(X, Y, bandwidth=h), shift=mu, dim=dim)
    assert_within_stderr(mean, target, stderr)


def test_energy_v_statistic_is_the_cdf_integral_in_1d():
    # for the empirical laws themselves E = 2 int (F_n - G_m)^2 du exactly
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 1, generator=g), torch.randn(25, 1, generator=g) + 0.5
    z = torch.cat([x, y]).flatten().sort().values
    F = (x.flatten()[None, :] <= z[:-1, None]).double().mean(1)
    G = (y.flatten()[None, :] <= z[:-1, None]).double().mean(1)
    exact = 2 * ((F - G) ** 2 * z.diff()).sum()
    assert energy_distance(x, y, unbiased=False) == pytest.approx(exact.item(), rel=1e-10)


@pytest.mark.parametrize("name", list(METRICS))
def test_symmetric(name):
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(60, 3, generator=g), 2 * torch.randn(45, 3, generator=g)
    assert METRICS[name](X, Y) == pytest.approx(METRICS[name](Y, X), rel=1e-10)


@pytest.mark.parametrize("metric", [energy_distance, mmd_rbf])
@pytest.mark.parametrize("unbiased", [True, False])
def test_chunking_does_not_change_the_value(metric, unbiased):
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(50, 2, generator=g), torch.randn(37, 2, generator=g)
    whole = metric(X, Y, unbiased=unbiased, chunk_size=1000)
    assert metric(X, Y, unbiased=unbiased, chunk_size=7) == pytest.approx(whole, rel=1e-10)


def test_v_statistics_are_nonnegative_and_zero_on_equal_sets():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 2, generator=g)
    for metric in (energy_distance, mmd_rbf):
        assert metric(X, X, unbiased=False) == pytest.approx(0.0, abs=1e-12)
        assert metric(X, X + 0.1, unbiased=False) > 0


def test_median_bandwidth_of_two_points():
    X, Y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert median_bandwidth(X, Y) == pytest.approx(5.0)


@pytest.mark.parametrize("num_projections", [1, 16])
@pytest.mark.parametrize("c", [-1.3, 0.0, 2.5])
def test_sliced_wasserstein_of_a_1d_shift_is_the_shift(c, num_projections):
    # in 1D every direction is +-1 and W_2(X, X + c) = |c|
    x = torch.randn(100, 1, generator=torch.Generator().manual_seed(7))
    assert sliced_wasserstein(x, x + c, num_projections=num_projections) == pytest.approx(abs(c))


@pytest.mark.parametrize("n, m", [(3, 3), (2, 5), (7, 4)])
def test_sliced_wasserstein_between_point_masses(n, m):
    a, b = 1.5, -0.5
    X, Y = torch.full((n, 1), a), torch.full((m, 1), b)
    assert sliced_wasserstein(X, Y) == pytest.approx(abs(a - b))


def test_sliced_wasserstein_exact_for_unequal_sizes():
    # quantiles of {0, 1} and {0, 1, 2} differ by 1 on (1/3, 1/2] and (2/3, 1]: W_2^2 = 1/6 + 1/3
    X, Y = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(X, Y) == pytest.approx(math.sqrt(0.5))
    # repeating a sample leaves its empirical law unchanged
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(8))
    assert sliced_wasserstein(x, torch.cat([x, x, x])) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_a_2d_shift():
    # each direction adds (theta^T c)^2 = |c|^2 cos^2(phi): mean |c|^2 / 2, variance |c|^4 / 8
    P, c = 400, torch.tensor([1.2, -0.9])
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(9))
    sw = sliced_wasserstein(x, x + c, num_projections=P, generator=torch.Generator().manual_seed(10))
    norm2 = c.pow(2).sum().item()
    assert_within_stderr(sw**2, norm2 / 2, norm2 / math.sqrt(8 * P))


@pytest.mark.parametrize("metric", list(METRICS.values()))
def test_mismatched_shapes_are_refused(metric):
    with pytest.raises(ValueError, match="same D"):
        metric(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        metric(torch.zeros(5), torch.zeros(5))
