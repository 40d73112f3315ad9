"""Runs evaluated and grids of runs compared: samples in the data's units, the grid's runs and
names, failures recorded rather than dropped, resume, worker processes that give the numbers of
one process, the summary's statistics, and ``pdiff compare`` end to end on tiny settings."""
import contextlib
import hashlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from pdiff import compare as C
from pdiff.cli import main
from pdiff.compare import (GridSpec, draw_samples, evaluate_run, prepare_out, results_table,
                           run_grid, sample_metrics, summarize)
from pdiff.data import fit_rescaling, get_toy, toy_split
from pdiff.distributions.reverse import ReverseProcess
from pdiff.oracle import MixtureDenoiser
from pdiff.sampling import ancestral_sample
from pdiff.schedules import make_schedule, spaced_steps
from pdiff.train import CHECKPOINT, Run, TrainConfig, Trainer, load_run
from tests.stats import assert_within_stderr

TINY = dict(data="mixture1d", timesteps=5, iterations=20, batch_size=32, train_size=500,
            test_size=200, hidden=16, depth=1, log_every=5, checkpoint_every=20, warmup=5)
TINY_ARGS = ["--data", "mixture1d", "--timesteps", "5", "--iterations", "20", "--batch-size", "32",
             "--train-size", "500", "--test-size", "200", "--hidden", "16", "--depth", "1",
             "--log-every", "5", "--warmup", "5", "--eval-samples", "50", "--metric-samples", "50"]


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**(TINY | changes))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained on standardized mixture1d (the model works in units 3.9 times smaller)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny(rescale="standardize", objective="simple", variance="fixed_large")
    Trainer(cfg, out).train(progress=False)
    return load_run(out)


# -- samples and evaluation of one run -------------------------------------------------------------

def test_draw_samples_undoes_the_rescaling_exactly(trained):
    """The same seed gives the chain's own samples, mapped back to the data's units."""
    run = trained
    assert run.rescaling.scale.item() < 0.5  # standardizing mixture1d shrinks it
    x = draw_samples(run, 300, seed=3)
    assert x.shape == (300, 1) and x.dtype == torch.float64
    raw = ancestral_sample(run.model, (300, 1), generator=gen(3), dtype=torch.float32).x0.double()
    torch.testing.assert_close(x, run.rescaling.invert(raw), rtol=0, atol=0)
    torch.testing.assert_close(run.rescaling.apply(x), raw)  # the map training used, undone
    torch.testing.assert_close(draw_samples(run, 300, seed=3), x, rtol=0, atol=0)
    assert not torch.equal(draw_samples(run, 300, seed=4), x)
    assert draw_samples(run, 25, seed=0, chunk=10).shape == (25, 1)


@pytest.fixture
def oracle_run():
    """A Run holding the exact denoiser of standardized mixture1d (its samples have about the
    data's law), and the data distribution."""
    data = get_toy("mixture1d")
    rescaling = fit_rescaling("standardize", data, 1)
    s = make_schedule("cosine", 50)
    model = ReverseProcess(MixtureDenoiser(rescaling.mixture(data), s), s, prediction="x0",
                           variance="fixed_large")
    return Run(TrainConfig(data="mixture1d", timesteps=50), model, rescaling, 0), data


@pytest.mark.parametrize("sampling_timesteps", [None, 10])
def test_draw_samples_are_in_the_data_units(oracle_run, sampling_timesteps):
    """Samples of the oracle (on the full or a respaced chain) have the data's mean and variance:
    in the model's standardized units they would have mean 0 and variance 1, not 1.33 and 15.2."""
    run, data = oracle_run
    x = draw_samples(run, 4000, seed=0, sampling_timesteps=sampling_timesteps)[:, 0]
    n = len(x)
    mean, var = data.mean.item(), data.variance.item()
    assert_within_stderr(x.mean(), mean, x.std() / math.sqrt(n))
    sq = (x - mean) ** 2
    assert_within_stderr(sq.mean(), var, sq.std() / math.sqrt(n))


def test_respaced_sampling(oracle_run):
    run, _ = oracle_run
    K = 7
    x = draw_samples(run, 50, seed=1, sampling_timesteps=K)
    short = run.model.respaced(spaced_steps(50, K))
    assert short.num_timesteps == K
    raw = ancestral_sample(short, (50, 1), generator=gen(1), dtype=torch.float32).x0.double()
    torch.testing.assert_close(x, run.rescaling.invert(raw), rtol=0, atol=0)
    assert not torch.equal(x, draw_samples(run, 50, seed=1))
    # K = T is the full chain
    torch.testing.assert_close(draw_samples(run, 50, seed=1, sampling_timesteps=50),
                               draw_samples(run, 50, seed=1), rtol=0, atol=0)
    for bad in (0, 51):
        with pytest.raises(ValueError, match=r"sampling timesteps must be in 1\.\.50"):
            draw_samples(run, 5, sampling_timesteps=bad)


def test_evaluate_run_pairs_the_gap_on_the_test_points(trained):
    run = trained
    r = evaluate_run(run, samples=100, seed=0, metric_samples=50, entropy_samples=1000)
    data = get_toy("mixture1d")
    _, test = toy_split(data, 0, run.config.test_size, run.config.seed)
    # the gap is paired over the first 100 test points, in data units
    log_px = data.log_prob(test[:100].double())
    assert r["num_samples"] == 100
    assert r["gap_nats"] == pytest.approx(r["nll_nats"] + log_px.mean().item(), rel=1e-9)
    assert r["metric_samples"] == 50 and r["_samples"].shape == (50, 1)
    assert r["energy_distance"] == pytest.approx(
        sample_metrics(run, 50, seed=0)["energy_distance"], rel=1e-12)
    # a data file is not the test split: the gap is then bound minus the entropy estimate
    own = evaluate_run(run, x=test[:100], entropy_samples=1000)
    assert own["gap_nats"] == pytest.approx(own["nll_nats"] - own["entropy_nats"], rel=1e-12)
    assert "energy_distance" not in own
    with pytest.raises(ValueError, match="exceeds the run's test split"):
        evaluate_run(run, samples=201)
    with pytest.raises(ValueError, match="exceeds the run's test split"):
        sample_metrics(run, 201)


# -- the grid --------------------------------------------------------------------------------------

def test_grid_cells_names_and_configurations():
    spec = GridSpec(tiny(), {"objective": ("simple", "vlb"), "schedule": ("linear", "cosine")},
                    (0, 1), eval_samples=50, metric_samples=50)
    assert spec.cells() == [{"objective": o, "schedule": s}
                            for o in ("simple", "vlb") for s in ("linear", "cosine")]
    runs = spec.configs()
    names = [name for name, _, _ in runs]
    assert len(set(names)) == len(names) == 8
    assert names[:3] == ["simple-linear-s0", "simple-linear-s1", "simple-cosine-s0"]
    for name, cell, cfg in runs:
        assert (cfg.objective, cfg.schedule) == (cell["objective"], cell["schedule"])
        assert name.endswith(f"-s{cfg.seed}")
        assert cfg.timesteps == 5  # the base is kept


def test_excluded_cells_are_left_out():
    """A partial cell drops every cell agreeing with it on the fields it names, whatever the
    other axes say; the rest keep their order and names."""
    axes = {"objective": ("simple", "vlb"), "variance": ("fixed_large", "learned_range"),
            "schedule": ("linear", "cosine")}
    spec = GridSpec(tiny(), axes, (0,), eval_samples=50, metric_samples=50,
                    exclude=({"objective": "simple", "variance": "learned_range"},
                             {"schedule": "cosine", "objective": "vlb"}))
    full = GridSpec(tiny(), axes, (0,), eval_samples=50, metric_samples=50).cells()
    want = [c for c in full
            if not (c["objective"] == "simple" and c["variance"] == "learned_range")
            and not (c["objective"] == "vlb" and c["schedule"] == "cosine")]
    assert spec.cells() == want and len(want) == 4
    assert [n for n, _, _ in spec.configs()] == [
        "simple-fixed_large-linear-s0", "simple-fixed_large-cosine-s0",
        "vlb-fixed_large-linear-s0", "vlb-learned_range-linear-s0"]


@pytest.mark.parametrize("exclude, message", [
    (({"objective": "trajectory"},), "must name values of the grid's axes"),
    (({"schedule": "linear"},), "must name values of the grid's axes.*schedule='linear'"),
    (({},), "got nothing"),
    (({"objective": "simple"}, {"objective": "vlb"}), "leave no cell"),
])
def test_invalid_exclusions_are_refused(exclude, message):
    with pytest.raises(ValueError, match=message):
        GridSpec(tiny(), {"objective": ("simple", "vlb")}, (0,), exclude=exclude)


@pytest.mark.parametrize("axes, seeds, kw, message", [
    ({"seed": (0, 1)}, (0,), {}, "cannot vary 'seed'"),
    ({"nope": (1,)}, (0,), {}, "cannot vary 'nope'"),
    ({}, (0,), {}, "at least one axis"),
    ({"objective": ()}, (0,), {}, "at least one value"),
    ({"objective": ("simple",)}, (), {}, "at least one seed"),
    ({"schedule": ("linear", "linear")}, (0,), {}, "names a value twice"),
    ({"objective": ("simple",)}, (0, 0), {}, "names a value twice"),
])
def test_invalid_grids_are_refused(axes, seeds, kw, message):
    with pytest.raises(ValueError, match=message):
        GridSpec(tiny(), axes, seeds, **kw)


@pytest.mark.parametrize("axes, kw, message", [
    ({"schedule": ("linear", "nope")}, {}, "schedule 'nope'.*unknown schedule 'nope'; valid: "),
    ({"variance": ("fixed_large",), "net": ("mean_variance",)}, {}, "need a learned variance"),
    ({"lr": (1e-3, -1.0)}, {}, "lr must be a finite number > 0"),
    ({"objective": ("simple",)}, {"eval_samples": 201}, r"must not exceed the test split \(200"),
    # test_size is itself an axis: each run's own split is checked
    ({"test_size": (200, 40)}, {"metric_samples": 50}, r"test_size 40: .*\(40 points\)"),
])
def test_every_run_is_checked_before_anything_runs(axes, kw, message):
    spec = GridSpec(tiny(), axes, (0,), **({"eval_samples": 50, "metric_samples": 50} | kw))
    with pytest.raises(ValueError, match=message):
        spec.configs()


@pytest.mark.parametrize("field", sorted(TrainConfig.CHOICES))
def test_train_config_names_the_valid_choices(field):
    """A grid sets fields directly, past the command line's choices: validate checks every one."""
    with pytest.raises(ValueError) as e:
        tiny(**{field: "nope"}).validate()
    message = str(e.value)
    assert "'nope'" in message
    for valid in TrainConfig.CHOICES[field]:
        assert valid in message


def failing_trainer(fail):
    """Trainer whose training raises for the configurations ``fail(cfg)`` picks."""
    class Failing(Trainer):
        def train(self, progress=True):
            if fail(self.cfg):
                raise RuntimeError(f"boom {self.cfg.objective} {self.cfg.seed}")
            return super().train(progress=progress)
    return Failing


def test_failed_runs_are_recorded_and_the_others_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "Trainer", failing_trainer(
        lambda cfg: cfg.objective == "vlb" or cfg.seed == 1))
    spec = GridSpec(tiny(variance="fixed_large"), {"objective": ("simple", "vlb")}, (0, 1),
                    eval_samples=50, metric_samples=0)
    records = run_grid(spec, tmp_path, jobs=1)
    assert [r["name"] for r in records] == ["simple-s0", "simple-s1", "vlb-s0", "vlb-s1"]
    status = {r["name"]: r["status"] for r in records}
    assert status == {"simple-s0": "ok", "simple-s1": "failed", "vlb-s0": "failed",
                      "vlb-s1": "failed"}
    assert records[1]["error"] == "RuntimeError: boom simple 1"
    assert records[0]["eval"]["num_samples"] == 50 and records[0]["trained_steps"] == 20
    saved = json.loads((tmp_path / "runs" / "vlb-s0" / C.EVAL_FILE).read_text())
    assert saved["status"] == "failed" and "boom vlb 0" in saved["error"]

    rows = summarize(records)
    assert [r["cell"]["objective"] for r in rows] == ["simple", "vlb"]
    simple, vlb = rows
    assert (simple["ok"], simple["runs"]) == (1, 2) and list(simple["failed"]) == ["simple-s1"]
    assert simple["nll_nats"] == records[0]["eval"]["nll_nats"] and simple["nll_nats_se"] is None
    assert (vlb["ok"], vlb["runs"]) == (0, 2) and vlb["nll_nats"] is None
    table = results_table(rows).splitlines()
    assert len(table) == 4  # header, rule and both cells: the failed one is not dropped
    assert "| simple | 1/2 (failed: simple-s1) |" in table[2]
    assert "| vlb | 0/2 | failed: RuntimeError: boom vlb 0 |" in table[3]


def test_resume_reuses_finished_runs_and_retries_failed_ones(tmp_path, monkeypatch):
    spec = GridSpec(tiny(variance="fixed_large"), {"objective": ("simple", "vlb")}, (0,),
                    eval_samples=50, metric_samples=0)
    monkeypatch.setattr(C, "Trainer", failing_trainer(lambda cfg: cfg.objective == "vlb"))
    first = run_grid(spec, tmp_path, jobs=1)
    assert [r["status"] for r in first] == ["ok", "failed"]
    built = []

    class Recording(Trainer):
        def __init__(self, cfg, out, **kw):
            built.append(cfg.objective)
            super().__init__(cfg, out, **kw)

    monkeypatch.setattr(C, "Trainer", Recording)
    again = run_grid(spec, tmp_path, jobs=1, resume=True)
    assert built == ["vlb"]  # the finished run is not trained again
    assert again[0]["reused"] is True and again[0]["eval"] == first[0]["eval"]
    assert again[1]["status"] == "ok" and "reused" not in again[1]
    # more iterations: not finished any more, so each run continues from its checkpoint
    longer = GridSpec(tiny(variance="fixed_large", iterations=30), spec.axes, (0,),
                      eval_samples=50, metric_samples=0)
    built.clear()
    more = run_grid(longer, tmp_path, jobs=1, resume=True)
    assert built == ["simple", "vlb"]
    assert [r["trained_steps"] for r in more] == [10, 10]
    assert all(load_run(r["run_dir"]).step == 30 for r in more)


def _record(name, cell, nll, gap, ed, seconds, status="ok"):
    ev = {"nll_nats": nll, "gap_nats": gap, "prior_nats": 0.01 * nll,
          "terms_nats": [-1.0, nll, 2.0], "energy_distance": ed, "sliced_wasserstein": 2 * ed}
    return {"name": name, "cell": cell, "seed": int(name[-1]), "status": status,
            "train_seconds": seconds, "train_cpu_seconds": seconds / 2} | (
        {"eval": ev} if status == "ok" else {"error": "ValueError: bad"})


def test_summary_mean_and_standard_error_across_seeds():
    a, b = {"objective": "simple"}, {"objective": "vlb"}
    nll, gap, ed, secs = [3.0, 4.5, 2.0], [0.5, 0.1, None], [0.1, 0.3, 0.2], [10.0, 12.0, 20.0]
    records = [_record(f"simple-s{i}", a, nll[i], gap[i], ed[i], secs[i]) for i in range(3)]
    records.append(_record("simple-s3", a, 99.0, 99.0, 99.0, 99.0, status="failed"))
    records += [_record("vlb-s0", b, 7.0, 1.0, float("nan"), 5.0)]
    rows = summarize(records)
    assert [r["cell"] for r in rows] == [a, b]
    row = rows[0]
    assert (row["runs"], row["ok"], row["failed"]) == (4, 3, {"simple-s3": "ValueError: bad"})

    def mean_se(values):
        v = np.array(values)
        return v.mean(), v.std(ddof=1) / math.sqrt(len(v))

    for key, values in [("nll_nats", nll), ("gap_nats", gap[:2]), ("energy_distance", ed),
                        ("train_seconds", secs), ("train_cpu_seconds", [s / 2 for s in secs]),
                        ("transition_nats", [n + 2.0 for n in nll]),
                        ("sliced_wasserstein", [2 * e for e in ed])]:
        m, se = mean_se(values)
        assert row[key] == pytest.approx(m, rel=1e-12), key
        assert row[key + "_se"] == pytest.approx(se, rel=1e-12), key
    assert row["decoder_nats"] == -1.0 and row["decoder_nats_se"] == 0.0
    assert row["terms_nats"] == pytest.approx([-1.0, np.mean(nll), 2.0], rel=1e-12)
    # one seed: a mean without a standard error; a non-finite value is left out
    assert rows[1]["nll_nats"] == 7.0 and rows[1]["nll_nats_se"] is None
    assert rows[1]["energy_distance"] is None
    line = results_table(rows).splitlines()[2]
    m, se = mean_se(nll)
    assert f"| 3/4 (failed: simple-s3) | {m:.3f} ± {se:.3f} |" in line


def test_prepare_out(tmp_path):
    out = tmp_path / "cmp"
    (out / "figures").mkdir(parents=True)
    for name in ("results.json", "results.md", "figures/data.png", "notes.txt"):
        (out / name).write_text(name)
    with pytest.raises(ValueError, match="not empty; pass --resume .* or --force"):
        prepare_out(out)
    assert prepare_out(out, resume=True) == out and (out / "results.json").exists()
    prepare_out(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_out(tmp_path / "file")
    with pytest.raises(ValueError, match="cannot write"):
        prepare_out(tmp_path / "file" / "cmp")


# -- pdiff compare ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``pdiff compare`` on a 2 objectives x 2 seeds grid, in two worker processes, with figures.

    Run as the command line runs, in float32 (the workers start with torch's default dtype, not
    the float64 that conftest sets), and with one thread per worker as the tests have, so that
    the in-process rerun below does the same arithmetic.
    """
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", "--out", str(out), "--objectives", "simple,vlb",
            "--variances", "fixed_large", "--seeds", "2", "--jobs", "2", *TINY_ARGS]
    stdout, stderr = io.StringIO(), io.StringIO()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            mp.setattr(os, "cpu_count", lambda: 2)
            code = main(argv)
    finally:
        torch.set_default_dtype(old)
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_compare_writes_results(compared):
    code, stdout, stderr, out = compared
    assert code == 0, stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("pdiff compare --out")
    assert doc["axes"] == {"objective": ["simple", "vlb"], "variance": ["fixed_large"]}
    assert doc["seeds"] == [0, 1] and doc["base_config"]["timesteps"] == 5
    assert [r["name"] for r in doc["runs"]] == ["simple-fixed_large-s0", "simple-fixed_large-s1",
                                                "vlb-fixed_large-s0", "vlb-fixed_large-s1"]
    assert all(r["status"] == "ok" and r["eval"]["num_samples"] == 50
               and r["eval"]["metric_samples"] == 50 for r in doc["runs"])
    assert [r["cell"]["objective"] for r in doc["summary"]] == ["simple", "vlb"]
    for row in doc["summary"]:
        nll = [r["eval"]["nll_nats"] for r in doc["runs"] if r["cell"] == row["cell"]]
        assert (row["ok"], row["runs"]) == (2, 2)
        assert row["nll_nats"] == pytest.approx(np.mean(nll), rel=1e-12)
        assert row["nll_nats_se"] == pytest.approx(np.std(nll, ddof=1) / math.sqrt(2), rel=1e-12)
    table = stdout.split("\n\nresults:")[0].strip()
    assert table.startswith("| objective | variance | seeds ok |") and len(table.splitlines()) == 4
    assert table in (out / "results.md").read_text()
    assert "[4/4]" in stderr and "2 at a time" in stderr
    for r in doc["runs"]:
        assert (out / "runs" / r["name"] / CHECKPOINT).is_file()
        assert torch.load(out / "runs" / r["name"] / C.SAMPLES_FILE).shape == (50, 1)


def test_compare_draws_the_figures(compared):
    code, _, _, out = compared
    assert code == 0
    figures = json.loads((out / "results.json").read_text())["figures"]
    names = {f.split("/")[-1] for f in figures}
    assert {"data.png", "schedule.png", "forward.png", "forward.gif", "bound_terms.png",
            "loss_simple.png", "loss_vlb.png", "samples.png", "best_reverse.png"} <= names
    md = (out / "results.md").read_text()
    for f in figures:
        data = (out / f).read_bytes()
        assert len(data) > 1000 and data[:4] in (b"\x89PNG", b"GIF8"), f
        assert f"]({f})" in md


def test_worker_processes_give_the_numbers_of_one_process(compared, tmp_path):
    """The same grid run in this process (jobs=1) reproduces every number of the two workers:
    training and evaluation are seeded, and nothing depends on which process ran a run."""
    _, _, _, out = compared
    doc = json.loads((out / "results.json").read_text())
    axes = {k: tuple(v) for k, v in doc["axes"].items()}
    spec = GridSpec(TrainConfig(**doc["base_config"]), axes, tuple(doc["seeds"]),
                    eval_samples=doc["eval_samples"], metric_samples=doc["metric_samples"])
    torch.set_default_dtype(torch.float32)  # as in the workers (conftest restores float64)
    records = run_grid(spec, tmp_path, jobs=1)
    for mine, theirs in zip(records, doc["runs"], strict=True):
        assert mine["name"] == theirs["name"]
        assert mine["final_loss"] == theirs["final_loss"]
        timing = ("wall_seconds",)  # the estimator's wall time is no number of the model
        assert ({k: v for k, v in mine["eval"].items() if k not in timing}
                == {k: v for k, v in theirs["eval"].items() if k not in timing})
        torch.testing.assert_close(torch.load(tmp_path / "runs" / mine["name"] / C.SAMPLES_FILE),
                                   torch.load(out / "runs" / mine["name"] / C.SAMPLES_FILE),
                                   rtol=0, atol=0)


def test_compare_exits_1_when_every_run_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "Trainer", failing_trainer(lambda cfg: True))
    out = tmp_path / "out"
    code, stdout, err = cli(["compare", "--out", str(out), "--objectives", "simple",
                             "--variances", "fixed_large", "--seeds", "2", "--jobs", "1",
                             "--no-figures", *TINY_ARGS], capsys)
    assert code == 1
    assert "| simple | fixed_large | 0/2 | failed: RuntimeError: boom simple 0 |" in stdout
    assert "FAILED: RuntimeError: boom simple 1" in err
    md = (out / "results.md").read_text()
    assert "Failed runs:" in md and "- simple-fixed_large-s1: RuntimeError: boom simple 1" in md
    assert not (out / "figures").exists()


def _snapshot(folder):
    """Every path under ``folder``, with each file's content hash and modification time."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_compare_refuses_a_non_empty_out_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs" / "simple-fixed_large-s0").mkdir(parents=True)
    (out / "results.json").write_text('{"mine": 1}')
    (out / "runs" / "simple-fixed_large-s0" / "eval.json").write_text("{}")
    before = _snapshot(out)
    code, _, err = cli(["compare", "--out", str(out), "--objectives", "simple", "--variances",
                        "fixed_large", "--seeds", "1", "--jobs", "1", "--no-figures", *TINY_ARGS],
                       capsys)
    assert code == 2 and "not empty; pass --resume" in err and "Traceback" not in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("extra, message", [
    (["--objectives", "simple,nope"], "'nope' not valid; choose from simple"),
    (["--variances", "nope"], "'nope' not valid; choose from fixed_small"),
    (["--objectives", "simple,simple"], "names an item twice"),
    (["--grid", "timesteps=5,x"], "timesteps takes int values"),
    (["--grid", "nope=1,2"], "unknown option 'nope'; valid: "),
    (["--grid", "seed=1,2"], "use --objectives, --variances or --seeds"),
    (["--grid", "schedule"], "expected OPTION=V1,V2"),
    (["--grid", "schedule=linear", "--grid", "schedule=cosine"], "names 'schedule' twice"),
    (["--grid", "schedule=linear,linear"], "names a value twice"),
    (["--grid", "schedule=linear,nope"], "unknown schedule 'nope'"),
    (["--net", "mean_variance"], "need a learned variance"),
    (["--eval-samples", "201"], "must not exceed the test split"),
    (["--grid", "test_size=200,40"], r"(40 points)"),
    (["--grid", "hidden=8,16"], "--hidden given both as an option and in --grid"),
    (["--exclude", "objective=simple"], "leave no cell"),
    (["--exclude", "objective=vlb"], "must name values of the grid's axes"),
    (["--exclude", "nope=1"], "expected OPTION=VALUE[,OPTION=VALUE...] over the grid's axes"),
    (["--exclude", "objective"], "expected OPTION=VALUE"),
    (["--grid", "depth=1,2", "--exclude", "depth=x"], "depth takes int values"),
])
def test_compare_mistakes_exit_2_before_writing_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    tiny = list(TINY_ARGS)
    for grid, option in (("test_size=200,40", "--test-size"), ("depth=1,2", "--depth")):
        if grid in extra:  # the grid sets it: not also as an option
            i = tiny.index(option)
            del tiny[i:i + 2]
    code, _, err = cli(["compare", "--out", str(out), "--objectives", "simple", "--variances",
                        "fixed_large", "--seeds", "1", "--jobs", "1", "--no-figures", *tiny,
                        *extra], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_compare_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("user data")
    argv = ["compare", "--objectives", "simple", "--variances", "fixed_large", "--seeds", "1",
            "--jobs", "1", "--no-figures", *TINY_ARGS]
    code, _, err = cli(argv + ["--out", str(blocker / "out")], capsys)
    assert code == 2 and "cannot write to comparison directory" in err
    code, _, err = cli(argv + ["--out", str(blocker)], capsys)
    assert code == 2 and "is a file, not a directory" in err
    assert blocker.read_text() == "user data"


def test_compare_read_only_parent_exits_2(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("permissions do not stop this user writing (root)")
        code, _, err = cli(["compare", "--out", str(locked / "out"), "--objectives", "simple",
                            "--variances", "fixed_large", "--seeds", "1", "--jobs", "1",
                            "--no-figures", *TINY_ARGS], capsys)
        assert code == 2 and "cannot write to comparison directory" in err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_compare_grid_over_predictions_with_v(tmp_path, capsys):
    """``--grid prediction=eps,v``: each prediction trains, evaluates and samples."""
    out = tmp_path / "out"
    code, stdout, err = cli(["compare", "--out", str(out), "--objectives", "simple", "--variances",
                             "fixed_large", "--grid", "prediction=eps,v", "--seeds", "1",
                             "--jobs", "1", "--no-figures", *TINY_ARGS], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["axes"]["prediction"] == ["eps", "v"]
    assert [r["cell"]["prediction"] for r in doc["runs"]] == ["eps", "v"]
    assert all(r["status"] == "ok" and math.isfinite(r["eval"]["nll_nats"]) for r in doc["runs"])
    assert load_run(out / "runs" / doc["runs"][1]["name"]).model.prediction == "v"


def test_the_schedule_figures_show_the_first_cells_own_schedule():
    """The comparison's schedule figures are drawn from the first cell's schedule, T and
    endpoints (not the schedule's defaults)."""
    from pdiff.compare import _first_schedule

    spec = GridSpec(base=TrainConfig(data="clusters8", timesteps=250, beta_start=4e-4, beta_end=0.08),
                    axes={"schedule": ("quadratic", "linear")}, seeds=(0,))
    schedule, name, T = _first_schedule(spec)
    assert (name, T) == ("quadratic", 250)
    expected = make_schedule("quadratic", 250, beta_start=4e-4, beta_end=0.08)
    torch.testing.assert_close(schedule.betas, expected.betas, rtol=0, atol=0)
    assert schedule.betas[-1].item() == pytest.approx(0.08)
