"""The 2D tutorial systems reproduced from their experiments: one cell of
``experiments/clusters8_schedules.py`` and of ``experiments/moons_polynomial.py`` trained and
evaluated by ``pdiff.compare.compare`` from the experiment's own ``spec()`` (what the script runs),
on a reduced setting, and the numbers it reports checked against ranges that follow from the
system.

- The bound is an upper bound on the model's cross-entropy, itself at least the data entropy H:
  the paired gap (bound + log p_data, averaged over the test points) is at least -Z standard
  errors (``tests/stats.py``). Above H it must lie within a margin measured on this setting
  (given at each test).
- The 8 clusters have equal weights: each cluster's share of the model's samples is 1/8 within Z
  binomial standard errors.
- The moons: the model's samples are closer to held-out data, in energy distance, than samples of
  the Gaussian fitted to the training data, by more than Z standard errors of the difference.

Each takes 15 to 35 s of CPU on one core (training dominates; the moons test the most), about
three times that in wall time on a core shared with other jobs.
"""
import importlib
import json
import math
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import pdiff.compare
from pdiff.compare import SAMPLES_FILE, compare
from pdiff.metrics import energy_distance
from pdiff.run_data import load_run_data
from pdiff.train import load_run
from tests.stats import Z

# the 8 clusters' centres (pdiff.data.toy.clusters8)
CENTRES = 4 * torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0],
                            [0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])


@contextmanager
def _float32():
    """Run as the command line runs, in float32 (conftest sets float64 for the tests)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def cheap_entropy(monkeypatch):
    """The entropy each run reports from 2000 points instead of 100,000 (on the moons a density
    by quadrature, most of a run's evaluation time). The gaps checked here do not use it: they
    are paired with log p_data at the test points themselves."""
    entropy_mc = pdiff.compare.entropy_mc
    monkeypatch.setattr(pdiff.compare, "entropy_mc", lambda dist, num, generator=None:
                        entropy_mc(dist, min(num, 2000), generator))


def _run_cell(name, cell, out, *, spec_changes=None, **base_changes):
    """One seed of one cell of experiment ``name`` through ``compare``: its record and the spec."""
    full = importlib.import_module(f"experiments.{name}").spec()
    spec = replace(full, axes={k: (v,) for k, v in cell.items()}, seeds=(0,),
                   base=replace(full.base, **base_changes), **(spec_changes or {}))
    with _float32():
        result = compare(spec, out, jobs=1, figures=False)
    record = result.records[0]
    assert record["status"] == "ok", record.get("error")
    return record, spec


def _check_bound(ev, margin):
    """H - Z se <= bound <= H + margin, by the paired gap."""
    assert ev["gap_nats"] >= -Z * ev["gap_stderr"], ev
    assert ev["gap_nats"] <= margin, ev


@pytest.mark.parametrize("schedule", ["linear", "quadratic"])
def test_clusters8_bound_and_cluster_shares(schedule, tmp_path):
    """The 8 clusters with learned_range variances (hybrid loss, T = 250, beta 4e-4 to 0.08), half
    the experiment's 3000 steps. Margin: measured gaps at 1500 steps, seeds 0-2, were 0.44-0.50
    nats (linear) and 0.30-0.36 (quadratic), standard error 0.03, and about 0.3 at 3000 steps;
    0.7 is the largest of them plus 5 standard errors. (A Gaussian fitted to the data is 4.3
    nats above H; clusters of twice the width would be 0.64 above.)"""
    record, spec = _run_cell("clusters8_schedules", {"schedule": schedule,
                                                     "variance": "learned_range"},
                             tmp_path / "cmp", iterations=1500)
    ev = record["eval"]
    assert ev["prior_nats"] < 0.01  # alpha_bar_T = 3.3e-5 (linear) and 6.3e-4 (quadratic)
    _check_bound(ev, margin=0.7)
    samples = torch.load(tmp_path / "cmp" / "runs" / record["name"] / SAMPLES_FILE)
    n = len(samples)
    assert n == spec.metric_samples == 1000
    dist = torch.cdist(samples.double(), CENTRES.double())
    nearest = dist.argmin(1)
    shares = torch.bincount(nearest, minlength=8).double() / n
    se = math.sqrt(1 / 8 * 7 / 8 / n)
    assert ((shares - 1 / 8).abs() <= Z * se).all(), shares
    # and the samples are at the clusters, not between them: data lie within 5 std (0.5) of their
    # centre with probability 1 - exp(-12.5); measured 0.95-0.97 of the samples at 1500 steps
    assert (dist.min(1).values <= 0.5).double().mean() >= 0.9


def _distance_sums(X, Y, chunk=1000):
    """Row and column sums of the matrix |x_i - y_j|, a chunk of rows at a time."""
    rows, cols = [], X.new_zeros(len(Y))
    for start in range(0, len(X), chunk):
        d = torch.cdist(X[start:start + chunk], Y, compute_mode="donot_use_mm_for_euclid_dist")
        rows.append(d.sum(1))
        cols += d.sum(0)
    return torch.cat(rows), cols


def _energy_terms(X, Y):
    """v = 2 mean|x - y| - mean_{i != i'} |x_i - x_i'|, the part of the (unbiased) energy distance
    between X and Y that depends on X (the distance is v - mean_{j != j'} |y_j - y_j'|), and its
    leave-one-out values over the points of X and over those of Y (for the jackknife)."""
    n, m = len(X), len(Y)
    cx, cy = _distance_sums(X, Y)
    a, _ = _distance_sums(X, X)
    C, A = cx.sum(), a.sum()
    value = 2 * C / (n * m) - A / (n * (n - 1))
    loo_x = 2 * (C - cx) / ((n - 1) * m) - (A - 2 * a) / ((n - 1) * (n - 2))
    loo_y = 2 * (C - cy) / (n * (m - 1)) - A / (n * (n - 1))
    return value, loo_x, loo_y


def _jackknife_var(loo):
    k = len(loo)
    return (k - 1) / k * ((loo - loo.mean()) ** 2).sum()


def test_energy_terms_reproduce_the_energy_distance():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(300, 2, generator=gen), torch.randn(200, 2, generator=gen) + 0.5
    value, loo_x, loo_y = _energy_terms(X, Y)
    yy, _ = _distance_sums(Y, Y)
    assert float(value - yy.sum() / (200 * 199)) == pytest.approx(energy_distance(X, Y), rel=1e-10)
    without_x7 = _energy_terms(torch.cat([X[:7], X[8:]]), Y)[0]
    without_y3 = _energy_terms(X, torch.cat([Y[:3], Y[4:]]))[0]
    assert float(loo_x[7]) == pytest.approx(float(without_x7), rel=1e-10)
    assert float(loo_y[3]) == pytest.approx(float(without_y3), rel=1e-10)


def test_moons_bound_and_samples_near_the_moons(tmp_path, cheap_entropy):
    """The moons in [-1, 1], T = 10, polynomial schedule, one-hot time embedding, the hybrid loss
    with learned_range variances: the experiment's cell with the lowest bound, at its full 3000
    steps, with 6000 model samples (the experiment draws 1000) so that the energy distances
    separate. Margin: measured gaps at 3000 steps, seeds 0-2, were 0.70-0.83 nats, standard error
    0.037; 1.0 is about the largest plus 5 standard errors. (Ten Gaussian steps are a coarse
    model: the Gaussian fitted to the data is itself 0.9 nats above H. Its samples are far worse,
    which the energy distance shows.)"""
    num = 6000
    cell = {"objective": "hybrid", "variance": "learned_range"}
    record, _ = _run_cell("moons_polynomial", cell, tmp_path / "cmp", test_size=8000,
                          spec_changes={"metric_samples": num})
    ev = record["eval"]
    _check_bound(ev, margin=1.0)
    run = load_run(record["run_dir"])
    with _float32():  # the splits as the run drew them
        data = load_run_data(run.config, train=True)
    held_out = data.test[-num:].double()  # the points the run's sample metrics used
    samples = torch.load(tmp_path / "cmp" / "runs" / record["name"] / SAMPLES_FILE).double()
    train = run.rescaling.invert(data.train.double())
    chol = torch.linalg.cholesky(torch.cov(train.T))
    gauss = train.mean(0) + torch.randn(num, 2, generator=torch.Generator().manual_seed(1)) @ chol.T
    v_model, model_x, model_y = _energy_terms(samples, held_out)
    v_gauss, gauss_x, gauss_y = _energy_terms(gauss, held_out)
    yy, _ = _distance_sums(held_out, held_out)
    assert float(v_model - yy.sum() / (num * (num - 1))) == pytest.approx(ev["energy_distance"],
                                                                           rel=1e-6, abs=1e-9)
    gain = float(v_gauss - v_model)  # = ED(Gaussian, held out) - ED(model, held out)
    se = math.sqrt(_jackknife_var(model_x) + _jackknife_var(gauss_x)
                   + _jackknife_var(gauss_y - model_y))
    assert gain >= Z * se, (gain, se, ev["energy_distance"])


def test_a_2d_comparison_animates_each_cells_reverse_chains(tmp_path, cheap_entropy):
    """The moons' quick grid, two of its cells, with figures: one reverse GIF per cell (first
    seed), a frame per step t = 10..0, listed in the results."""
    from PIL import Image

    name = "moons_polynomial"
    quick = importlib.import_module(f"experiments.{name}").spec(quick=True)
    spec = replace(quick, axes={"objective": ("hybrid",),
                                "variance": ("fixed_large", "learned_range")})
    out = tmp_path / "cmp"
    with _float32():
        result = compare(spec, out, jobs=1)
    assert all(r["status"] == "ok" for r in result.records)
    listed = json.loads((out / "results.json").read_text())["figures"]
    for variance in ("fixed_large", "learned_range"):
        gif = out / "figures" / f"reverse_hybrid-{variance}.gif"
        assert f"figures/{gif.name}" in listed
        with Image.open(gif) as im:
            assert im.n_frames == spec.base.timesteps + 1
