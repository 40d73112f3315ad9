"""Every experiment in ``experiments/``: listed in ``EXPERIMENTS``, smoke-run on its ``--quick``
settings, and its full grid (or, for a pipeline experiment, its training) the setting the issue
asks for. The image pipelines' numbers are checked against ranges in test_experiment_images.py."""
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import pdiff.compare
from experiments import EXPERIMENTS
from pdiff.run_data import is_image_data
from pdiff.schedules import make_schedule
from tests.stats import Z

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def experiment(name):
    return importlib.import_module(f"experiments.{name}")


def full_configs(name):
    return [cfg for _, _, cfg in experiment(name).spec().configs()]


# Pipeline experiments train one model and evaluate it several ways (experiments/_pipeline.py):
# ``config(quick=False) -> TrainConfig`` in place of ``spec``. Each is listed here with the
# arguments its smoke run needs (CIFAR-10's files are not on a test machine: the same study on the
# digits); every other experiment is a grid, and fails the grid tests if it has no ``spec``.
PIPELINES = {"woodblock_clipping": [], "cifar10_guidance": ["--data", "digits"]}
GRIDS = sorted(set(EXPERIMENTS) - set(PIPELINES))


def test_every_experiment_module_is_listed():
    modules = {p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(EXPERIMENTS), "experiments/*.py and experiments.EXPERIMENTS disagree"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_is_a_grid_or_a_pipeline(name):
    module = experiment(name)
    if name in PIPELINES:
        assert callable(module.config) and not hasattr(module, "spec")
    else:
        assert callable(module.spec), f"{name}: a grid needs spec(), or list it in PIPELINES"
    assert callable(module.main)


@pytest.fixture
def cheap_entropy(monkeypatch):
    """The data entropy from 2000 points instead of 100,000: each run and the summary estimate it,
    which on the moons (a density by quadrature) would take most of a smoke run's time. The
    estimates themselves are checked against the reference values in tests/data/test_toy2d.py."""
    entropy_mc = pdiff.compare.entropy_mc
    monkeypatch.setattr(pdiff.compare, "entropy_mc",
                        lambda dist, num, generator=None: entropy_mc(dist, min(num, 2000), generator))


@pytest.mark.parametrize("name", GRIDS)
def test_quick_run_finishes_every_run(name, tmp_path, capsys, cheap_entropy):
    out = tmp_path / name
    assert experiment(name).main(["--quick", "--out", str(out), "--no-figures", "--jobs", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == len(experiment(name).spec(quick=True).configs())
    assert all(r["status"] == "ok" for r in doc["runs"]), [r.get("error") for r in doc["runs"]]
    out_text = capsys.readouterr().out
    image = is_image_data(experiment(name).spec(quick=True).base.data)
    assert ("bits/dim" if image else "nats") in out_text  # the table of the bound, in its units
    for r in doc["runs"]:  # even a 20-step model's numbers obey the bound's properties
        e = r["eval"]
        if image:  # every term a KL or -log of a probability of the discrete data
            assert 0 < e["bits_per_dim"] and math.isfinite(e["bits_per_dim"]), e
        else:  # a bound on the model's NLL, whose mean is at least the data entropy
            assert e["gap_nats"] >= -Z * e["gap_stderr"], e


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_quick_pipeline_run_finishes(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    # a feature classifier, if any, trained once per test session
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "feature_cache"))
    out = tmp_path / name
    assert experiment(name).main(["--quick", "--out", str(out), "--no-figures",
                                  *PIPELINES[name]]) == 0
    doc = json.loads((out / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert doc["experiment"] == name and doc["training"]["trained_steps"] == 20
    assert (out / "results.md").read_text().startswith(f"# {name}")
    assert "bits/dim" in capsys.readouterr().out  # the table of the bound, in its units


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_full_pipeline_validates_and_quick_keeps_its_model(name):
    """--quick shrinks the network, the steps and the chain (T = 100), not what is trained."""
    full, quick = experiment(name).config(), experiment(name).config(quick=True)
    full.validate()
    quick.validate()
    assert full.timesteps == 1000 and quick.timesteps == 100 and quick.iterations == 20
    for field in ("data", "schedule", "net", "embedding", "objective", "variance", "prediction",
                  "class_cond", "label_dropout"):
        assert getattr(quick, field) == getattr(full, field)


@pytest.mark.parametrize("name", GRIDS)
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
    assert {c.objective for c in configs} >= {"trajectory", "vlb"}  # the tutorial's own bound
    for c in configs:
        assert (c.data, c.net, c.timesteps, c.schedule) == ("mixture1d", "mean_variance", 250, "const")
    betas = make_schedule("const", 250).betas[1:]
    assert torch.equal(betas, torch.full_like(betas, 0.02))


def test_clusters8_is_the_tutorials_setting():
    """Linear and quadratic schedules, T = 250, from beta_1 = 4e-4 to beta_T = 0.08 (DDPM's ends
    scaled by 1000/T), a sinusoidal-embedding MLP."""
    configs = full_configs("clusters8_schedules")
    assert {c.schedule for c in configs} == {"linear", "quadratic"}
    for c in configs:
        assert (c.data, c.timesteps, c.net, c.embedding) == ("clusters8", 250, "mlp", "sinusoidal")
        assert (c.beta_start, c.beta_end) == pytest.approx((1e-4 * 1000 / 250, 0.02 * 1000 / 250))
        betas = make_schedule(c.schedule, c.timesteps, **c.schedule_options()).betas
        assert (betas[1].item(), betas[-1].item()) == pytest.approx((4e-4, 0.08), rel=1e-12)
        assert betas[1:].diff().gt(0).all()  # increasing from one end to the other


def test_moons_is_the_tutorials_setting():
    """sklearn's make_moons scaled to [-1, 1], T = 10, the polynomial schedule, a one-hot time
    embedding."""
    configs = full_configs("moons_polynomial")
    for c in configs:
        assert (c.data, c.timesteps, c.schedule, c.rescale) == ("sklearn_moons", 10, "polynomial", "minmax")
        assert c.embedding == "onehot"
    from dataclasses import replace

    from pdiff.run_data import load_run_data

    # minmax maps the range of 100,000 reference draws onto [-1, 1]: 2000 other draws nearly fill
    # it, and pass its ends by little if at all
    train = load_run_data(replace(configs[0], train_size=2000, test_size=10)).train
    assert (train.amin(0) < -0.85).all() and (train.amax(0) > 0.85).all()
    assert train.abs().max() < 1.1


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
