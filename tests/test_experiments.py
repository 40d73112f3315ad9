"""Every experiment in ``experiments/``: listed in ``EXPERIMENTS``, smoke-run on its ``--quick``
settings, and its full grid the setting the issue asks for."""
import importlib
import json
from pathlib import Path

import pytest
import torch

import pdiff.compare
from experiments import EXPERIMENTS
from pdiff.run_data import is_image_data
from pdiff.schedules import make_schedule

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def experiment(name):
    return importlib.import_module(f"experiments.{name}")


def full_configs(name):
    return [cfg for _, _, cfg in experiment(name).spec().configs()]


def test_every_experiment_module_is_listed():
    modules = {p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(EXPERIMENTS), "experiments/*.py and experiments.EXPERIMENTS disagree"


@pytest.fixture
def cheap_entropy(monkeypatch):
    """The data entropy from 2000 points instead of 100,000: each run and the summary estimate it,
    which on the moons (a density by quadrature) would take most of a smoke run's time. The
    estimates themselves are checked against the reference values in tests/data/test_toy2d.py."""
    entropy_mc = pdiff.compare.entropy_mc
    monkeypatch.setattr(pdiff.compare, "entropy_mc",
                        lambda dist, num, generator=None: entropy_mc(dist, min(num, 2000), generator))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_quick_run_finishes_every_run(name, tmp_path, capsys, cheap_entropy):
    out = tmp_path / name
    assert experiment(name).main(["--quick", "--out", str(out), "--no-figures", "--jobs", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == len(experiment(name).spec(quick=True).configs())
    assert all(r["status"] == "ok" for r in doc["runs"]), [r.get("error") for r in doc["runs"]]
    out_text = capsys.readouterr().out
    image = is_image_data(experiment(name).spec(quick=True).base.data)
    assert ("bits/dim" if image else "nats") in out_text  # the table of the bound, in its units


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_full_grid_validates_and_quick_keeps_its_cells(name):
    full, quick = experiment(name).spec(), experiment(name).spec(quick=True)
    assert len(full.configs()) == len(full.cells()) * 3 and len(full.seeds) == 3
    assert quick.cells() == full.cells()
    for field in ("data", "timesteps", "schedule", "rescale", "net", "embedding"):
        assert getattr(quick.base, field) == getattr(full.base, field)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_a_mistake_is_one_line_and_exit_code_2(name, tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert experiment(name).main(["--quick", "--out", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{name}: error:" in err and len(err.strip().splitlines()) == 1


def test_mixture1d_is_the_tutorials_setting():
    """Separate mean and variance networks on the full bound, T = 250, constant beta = 0.02."""
    configs = full_configs("mixture1d_mean_variance")
    assert {c.objective for c in configs} >= {"vlb"}
    for c in configs:
        assert (c.data, c.net, c.timesteps, c.schedule) == ("mixture1d", "mean_variance", 250, "const")
    betas = make_schedule("const", 250).betas[1:]
    assert torch.equal(betas, torch.full_like(betas, 0.02))


def test_clusters8_is_the_tutorials_setting():
    """Linear and quadratic schedules, T = 250, a sinusoidal-embedding MLP."""
    configs = full_configs("clusters8_schedules")
    assert {c.schedule for c in configs} == {"linear", "quadratic"}
    for c in configs:
        assert (c.data, c.timesteps, c.net, c.embedding) == ("clusters8", 250, "mlp", "sinusoidal")


def test_moons_is_the_tutorials_setting():
    """sklearn's make_moons scaled to [-1, 1], T = 10, the polynomial schedule."""
    configs = full_configs("moons_polynomial")
    for c in configs:
        assert (c.data, c.timesteps, c.schedule, c.rescale) == ("sklearn_moons", 10, "polynomial", "minmax")


def test_digits_is_the_published_ablation():
    """Objectives x fixed/learned variance x linear/cosine on the digits, T = 1000, in bits/dim,
    and Ho et al.'s mu~ prediction under the true bound with the linear schedule."""
    configs = full_configs("digits_objectives")
    assert len(configs) == 36
    mean = {(c.objective, c.variance, c.sampler, c.schedule) for c in configs if c.prediction == "mean"}
    assert mean == {("vlb", "fixed_large", "uniform", "linear"), ("vlb", "learned_range", "uniform", "linear")}
    assert {c.objective for c in configs} == {"simple", "hybrid", "vlb"}
    assert {c.variance for c in configs} == {"fixed_large", "learned_range"}
    assert {c.schedule for c in configs} == {"linear", "cosine"}
    assert all((c.data, c.timesteps) == ("digits", 1000) for c in configs)
