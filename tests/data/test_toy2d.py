"""Every registered toy: its exact density against its own sampler, and against FFJORD's generator.

Expectations under the density come from a midpoint grid. The grid lines sit on multiples of
STEP = 0.1, and the grid covers the samples' range plus an eighth of it on each side. Poisson
summation bounds the midpoint-sum error of a density blurred by Gaussian noise of scale l by
about 4 exp(-2 pi^2 l^2 / STEP^2); the narrowest blur here (rings, l = 0.08) gives 1.4e-5. The
checkerboard's edges lie on grid lines, so its sum is exact. Add < 1e-6 of tail mass and of
quadrature error in log_prob, and NORMALIZATION_TOL = 1e-3 leaves a wide margin.
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.datasets import make_circles, make_moons, make_swiss_roll

from pdiff.data import TOY_DATASETS, GaussianMixture, get_toy, has_exact_density
from tests.stats import Z, assert_within_stderr

NAMES = sorted(TOY_DATASETS)
NUM_SAMPLES = 20_000
STEP = 0.1
NORMALIZATION_TOL = 1e-3
BINS_PER_AXIS = 10

# H = E[-log p] in nats, from REFERENCE.md (Monte Carlo, 400k samples, stderr 0.002). Its
# "about 2.07" and "about 0.29" for the tutorial toys are replaced by the closed forms of these
# well-separated mixtures, H(Normal) + H(weights): 1.4189 + 0.6365 and -1.7672 + log 8.
REFERENCE_ENTROPY = {
    "8gaussians": 2.833, "checkerboard": math.log(32), "circles": 3.268, "rings": 2.621,
    "moons": 2.392, "swissroll": 2.670, "2spirals": 2.648, "pinwheel": 2.32,
    "mixture1d": 2.0554, "clusters8": 0.3122,
}
REFERENCE_PRECISION = 0.01


@functools.cache
def _toy(name: str) -> SimpleNamespace:
    """Samples, their log densities and the density on a grid over the support, computed once."""
    dist = get_toy(name)
    x = dist.sample((NUM_SAMPLES,), generator=torch.Generator().manual_seed(0))  # (N, D)
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    start = torch.floor((lo - (hi - lo) / 8) / STEP) * STEP
    counts = torch.ceil((hi + (hi - lo) / 8 - start) / STEP).long()
    axes = [s + STEP * (torch.arange(c) + 0.5) for s, c in zip(start, counts)]
    grid = torch.cartesian_prod(*axes).reshape(-1, len(axes))  # (G, D)
    toy = SimpleNamespace(dist=dist, x=x, grid=grid, start=start, counts=counts,
                          cell=STEP ** len(axes))
    if has_exact_density(dist):
        with torch.no_grad():
            log_p = dist.log_prob(torch.cat([x, grid]))
        toy.log_p, toy.grid_p = log_p[:len(x)], log_p[len(x):].exp()
    return toy


def _exact(name: str) -> SimpleNamespace:
    toy = _toy(name)
    if not has_exact_density(toy.dist):
        pytest.skip(f"{name} has no exact density")
    return toy


@pytest.mark.parametrize("name", NAMES)
def test_density_normalizes(name):
    toy = _toy(name)
    if not has_exact_density(toy.dist):
        with pytest.raises(NotImplementedError):
            toy.dist.log_prob(toy.x[:2])
        return
    integral = (toy.grid_p.sum() * toy.cell).item()
    assert abs(integral - 1) < NORMALIZATION_TOL, f"{name}: integral of p is {integral}"


def _test_functions(x: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Coordinates, their squares and cross product, and -log p: shape (n, F)."""
    cols = [x, x**2]
    if x.shape[-1] == 2:
        cols.append(x[:, :1] * x[:, 1:])
    return torch.cat(cols + [-log_p[:, None]], dim=-1)


@pytest.mark.parametrize("name", NAMES)
def test_sample_means_match_density(name):
    """E f by Monte Carlo equals the grid integral of f p, for moments and for f = -log p."""
    toy = _exact(name)
    f_mc = _test_functions(toy.x, toy.log_p)
    positive = toy.grid_p > 0  # the checkerboard's density vanishes off its squares
    log_grid = torch.where(positive, toy.grid_p.log(), torch.zeros_like(toy.grid_p))
    f_grid = _test_functions(toy.grid, log_grid)
    expected = (f_grid * (toy.grid_p * toy.cell)[:, None]).sum(dim=0)
    stderr = f_mc.std(dim=0) / math.sqrt(len(f_mc))
    assert_within_stderr(f_mc.mean(dim=0), expected, stderr, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_histogram_matches_density(name):
    """Pearson chi-square of binned samples against the grid's bin probabilities."""
    toy = _exact(name)
    per_bin = torch.ceil(toy.counts / BINS_PER_AXIS).long()  # grid cells per bin along each axis

    def bin_of(points):
        cell = torch.floor((points - toy.start) / STEP).long()
        bins = cell // per_bin
        return bins[:, 0] * BINS_PER_AXIS + bins[:, 1] if bins.shape[1] == 2 else bins[:, 0]

    size = BINS_PER_AXIS ** toy.x.shape[1]
    observed = torch.bincount(bin_of(toy.x), minlength=size).double()
    mass = torch.zeros(size).index_add(0, bin_of(toy.grid), toy.grid_p * toy.cell)
    expected = mass * len(toy.x)
    sparse = expected < 5  # pooled into one bin, as Pearson's approximation needs
    observed = torch.cat([observed[~sparse], observed[sparse].sum()[None]])
    expected = torch.cat([expected[~sparse], expected[sparse].sum()[None]])
    keep = expected > 0
    chi2 = ((observed - expected)[keep] ** 2 / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 <= df + Z * math.sqrt(2 * df), f"{name}: chi2 {chi2:.1f} on {df} degrees of freedom"


@pytest.mark.parametrize("name", NAMES)
def test_entropy_matches_reference(name):
    if name not in REFERENCE_ENTROPY:
        pytest.skip(f"no reference entropy for {name}")
    toy = _exact(name)
    nlp = -toy.log_p
    stderr = (nlp.std() / math.sqrt(len(nlp))).item()
    assert_within_stderr(nlp.mean(), REFERENCE_ENTROPY[name], max(stderr, REFERENCE_PRECISION / Z))


def _ffjord_sample(name: str, n: int, rng: np.random.RandomState) -> np.ndarray | None:
    """The generators of FFJORD's lib/toy_data.py (sklearn where FFJORD calls it), or None."""
    if name == "8gaussians":
        angle = rng.randint(8, size=n) * np.pi / 4
        return (4 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.5 * rng.randn(n, 2)) / 1.414
    if name == "checkerboard":
        x1 = rng.rand(n) * 4 - 2
        x2 = rng.rand(n) - rng.randint(0, 2, n) * 2 + np.floor(x1) % 2
        return 2 * np.stack([x1, x2], 1)
    if name == "circles":
        return 3 * make_circles(n, factor=0.5, noise=0.08, random_state=rng)[0]
    if name == "rings":
        angle = np.linspace(0, 2 * np.pi, n // 4, endpoint=False)
        circle = np.stack([np.cos(angle), np.sin(angle)], 1)
        x = 3 * np.concatenate([r * circle for r in (1.0, 0.75, 0.5, 0.25)])
        return x + rng.normal(scale=0.08, size=x.shape)
    if name in ("moons", "sklearn_moons"):
        x = make_moons(n, noise=0.1, random_state=rng)[0]
        return 2 * x + np.array([-1, -0.2]) if name == "moons" else x
    if name == "swissroll":
        return make_swiss_roll(n, noise=1.0, random_state=rng)[0][:, [0, 2]] / 5
    if name == "2spirals":
        t = np.sqrt(rng.rand(n // 2, 1)) * 540 * (2 * np.pi) / 360
        half = np.hstack([-np.cos(t) * t + rng.rand(n // 2, 1) * 0.5,
                          np.sin(t) * t + rng.rand(n // 2, 1) * 0.5])
        return np.vstack([half, -half]) / 3 + rng.randn(n, 2) * 0.1
    if name == "pinwheel":
        f = rng.randn(n, 2) * np.array([0.3, 0.1]) + np.array([1.0, 0.0])
        arm = np.repeat(np.linspace(0, 2 * np.pi, 5, endpoint=False), n // 5)
        angle = arm + 0.25 * np.exp(f[:, 0])
        rotations = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)])
        return 2 * np.einsum("ti,tij->tj", f, rotations.T.reshape(-1, 2, 2))
    return None


@pytest.mark.parametrize("name", NAMES)
def test_density_matches_ffjord_generator(name):
    """Cross-entropy of FFJORD's samples under our density equals our entropy iff they agree."""
    ref = _ffjord_sample(name, 10_000, np.random.RandomState(0))
    if ref is None:
        pytest.skip(f"{name} is not one of FFJORD's toys")
    toy = _exact(name)
    nlp_ref = -toy.dist.log_prob(torch.as_tensor(ref))
    nlp = -toy.log_p
    stderr = math.sqrt(nlp_ref.var() / len(nlp_ref) + nlp.var() / len(nlp))
    assert_within_stderr(nlp_ref.mean(), nlp.mean(), stderr, atol=1e-9)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_seed_reproduces_samples_with_shapes(name, shape):
    dist = get_toy(name)
    draw = lambda seed: dist.sample(shape, generator=torch.Generator().manual_seed(seed))
    x = draw(1)
    assert x.shape == torch.Size(shape) + dist.event_shape and x.dtype == torch.float64
    assert torch.equal(x, draw(1))
    assert not torch.equal(x, draw(2))
    if has_exact_density(dist):
        assert dist.log_prob(x).shape == torch.Size(shape)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        get_toy("no-such-toy")
    assert all(name in str(err.value) for name in TOY_DATASETS)


@pytest.mark.parametrize("per_dim", [False, True])
def test_gaussian_mixture_log_prob_is_sum_of_normals(per_dim):
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, generator=gen)
    stds = torch.rand((3, 2) if per_dim else (3,), generator=gen) + 0.5
    weights = torch.rand(3, generator=gen) + 0.1
    x = 2 * torch.randn(5, 2, generator=gen)
    stds_kd = (stds if per_dim else stds[:, None].expand(3, 2)).numpy()
    pdf = norm.pdf(x.numpy()[:, None, :], means.numpy(), stds_kd).prod(axis=-1)  # (5, 3)
    direct = np.log(pdf @ (weights / weights.sum()).numpy())
    got = GaussianMixture(means, stds, weights).log_prob(x)
    torch.testing.assert_close(got, torch.as_tensor(direct), rtol=1e-12, atol=1e-12)
