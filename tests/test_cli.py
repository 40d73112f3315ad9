"""The command line: a smoke run of every command on tiny settings, and every user mistake answered
with a clear one-line error and exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pdiff.cli import main
from pdiff.compare import draw_samples
from pdiff.data import get_toy
from pdiff.train import load_run

TINY = ["--timesteps", "20", "--samples", "200", "--entropy-samples", "2000", "--seed", "0"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_json_has_the_documented_fields(capsys):
    code, out, _ = run(["evaluate", "--data", "clusters8", "--denoiser", "oracle", "--schedule", "cosine",
                        "--variance", "fixed_large", "--decoder-variance", "beta1", "--rescale", "none",
                        "--json", *TINY], capsys)
    assert code == 0
    r = json.loads(out)
    for key in ("nll_nats", "nll_stderr", "bits_per_dim", "prior_nats", "terms_nats", "entropy_nats",
                "entropy_stderr", "num_samples"):
        assert key in r
    assert len(r["terms_nats"]) == 20 and r["num_samples"] == 200
    # nll = prior + sum of terms (no rescaling), bits/dim = nats / (D ln 2)
    assert r["nll_nats"] == pytest.approx(r["prior_nats"] + sum(r["terms_nats"]), rel=1e-9)
    assert r["bits_per_dim"] == pytest.approx(r["nll_nats"] / (2 * np.log(2)))


def test_rescaling_reports_nll_in_the_data_units(capsys):
    """The bound of the oracle is the same model whatever the affine rescaling (the oracle is exact
    in any units), so with the log-Jacobian the NLLs agree within standard errors."""
    results = {}
    for rescale in ("none", "standardize"):
        code, out, _ = run(["evaluate", "--data", "mixture1d", "--variance", "fixed_large",
                            "--decoder-variance", "beta1", "--rescale", rescale, "--json",
                            "--timesteps", "200", "--samples", "2000", "--entropy-samples", "2000"],
                           capsys)
        assert code == 0
        results[rescale] = json.loads(out)
    a, b = results["none"], results["standardize"]
    assert b["log_jacobian_nats"] != 0
    # Rescaling changes the chain relative to the data, so the bounds differ by the schedule's
    # effect only: both must sit at or above the entropy and within 0.3 nats of it.
    for r in (a, b):
        assert r["nll_nats"] > r["entropy_nats"] - 5 * r["gap_stderr"]
        assert r["nll_nats"] < r["entropy_nats"] + 0.3


def test_readable_summary(capsys):
    code, out, _ = run(["evaluate", "--data", "mixture1d", *TINY], capsys)
    assert code == 0 and "bound on -log p(x)" in out and "data entropy" in out


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--data", "nope"], "invalid choice"),
    (["evaluate", "--data", "mixture1d", "--schedule", "nope"], "invalid choice"),
    (["evaluate", "--data", "mixture1d", "--variance", "nope"], "fixed_small, fixed_large"),
    (["evaluate", "--data", "mixture1d", "--variance", "learned"], "fixed_small, fixed_large"),
    (["evaluate", "--data", "mixture1d", "--timesteps", "0"], "positive integer"),
    (["evaluate", "--data", "mixture1d", "--rescale", "nope"], "invalid choice"),
    (["evaluate", "--data", "moons"], "Gaussian-mixture"),
])
def test_bad_options_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    (np.array([[1.0, 2.0], [3.0, 4.0]]), "shape (N, 1)"),
    (np.array([[1.0], [np.nan]]), "non-finite"),
    (np.array([[1.0], [np.inf]]), "non-finite"),
])
def test_bad_data_file_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "points.npy"
    np.save(path, content)
    code, _, err = run(["evaluate", "--data", "mixture1d", "--data-file", str(path), *TINY], capsys)
    assert code == 2 and message in err


def test_data_file_is_evaluated(tmp_path, capsys):
    x = get_toy("mixture1d").sample((50,)).numpy()
    path = tmp_path / "points.csv"
    np.savetxt(path, x, delimiter=",")
    code, out, _ = run(["evaluate", "--data", "mixture1d", "--data-file", str(path), "--json", *TINY], capsys)
    assert code == 0 and json.loads(out)["num_samples"] == 50


@pytest.mark.parametrize("betas, message", [
    ([0.1, 0.0, 0.2], "strictly between 0 and 1"),
    ([0.1, 1.0], "strictly between 0 and 1"),
    ([0.1, float("nan")], "finite"),
])
def test_invalid_betas_exit_2(tmp_path, betas, message, capsys):
    path = tmp_path / "betas.txt"
    np.savetxt(path, np.array(betas))
    code, _, err = run(["evaluate", "--data", "mixture1d", "--betas", str(path), *TINY], capsys)
    assert code == 2 and message in err


def test_missing_file_exit_2(capsys):
    code, _, err = run(["evaluate", "--data", "mixture1d", "--data-file", "/nonexistent.npy"], capsys)
    assert code == 2 and "does not exist" in err


def test_console_script_exit_code():
    """The installed entry point returns main()'s code to the shell."""
    proc = subprocess.run([sys.executable, "-m", "pdiff.cli", "evaluate", "--data", "mixture1d",
                           "--variance", "learned"], capture_output=True, text=True)
    assert proc.returncode == 2 and "error" in proc.stderr


# -- pdiff sample and pdiff evaluate --checkpoint on a tiny trained run ----------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run on 2-D data (T = 5), with a 200-point test split."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "clusters8", "--rescale", "standardize",
                 "--objective", "simple", "--variance", "fixed_large", "--timesteps", "5",
                 "--iterations", "20", "--batch-size", "32", "--hidden", "16", "--depth", "1",
                 "--train-size", "500", "--test-size", "200", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def _read(path):
    if path.suffix == ".npy":
        return np.load(path)
    return np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".txt"])
def test_sample_writes_the_samples(run_dir, tmp_path, capsys, suffix):
    path = tmp_path / ("samples" + suffix)
    code, out, _ = run(["sample", "--checkpoint", str(run_dir), "--num", "30", "--out", str(path),
                        "--seed", "4"], capsys)
    assert code == 0
    x = _read(path)
    assert x.shape == (30, 2)
    expected = draw_samples(load_run(run_dir), 30, seed=4).numpy()
    np.testing.assert_allclose(x, expected, rtol=0 if suffix == ".npy" else 1e-7, atol=0)
    r = json.loads(out)
    assert (r["num"], r["dim"], r["sampling_timesteps"]) == (30, 2, 5)
    np.testing.assert_allclose(r["mean"], expected.mean(0), rtol=1e-6)


def test_sample_seed_steps_and_figure(run_dir, tmp_path, capsys):
    def sample(name, *extra):
        code, _, err = run(["sample", "--checkpoint", str(run_dir), "--num", "40",
                            "--out", str(tmp_path / name), *extra], capsys)
        assert code == 0, err
        return np.load(tmp_path / name)

    a, b = sample("a.npy", "--seed", "1"), sample("b.npy", "--seed", "1")
    c = sample("c.npy", "--seed", "2")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    short = sample("short.npy", "--seed", "1", "--sampling-timesteps", "2",
                   "--figure", str(tmp_path / "samples.png"))
    assert short.shape == (40, 2) and not np.array_equal(short, a)
    png = (tmp_path / "samples.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")


def test_sample_mistakes_exit_2_and_overwrite_nothing(run_dir, tmp_path, capsys):
    existing = tmp_path / "mine.npy"
    np.save(existing, np.arange(3.0))
    figure = tmp_path / "old.png"
    figure.write_bytes(b"an older figure")
    before = existing.read_bytes()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")

    def sample(checkpoint, out, *extra):
        return run(["sample", "--checkpoint", str(checkpoint), "--num", "10", "--out", str(out),
                    *extra], capsys)

    for args, message in [
        ((run_dir, existing), "exists; pass --force"),
        ((run_dir, tmp_path / "s.json"), "unknown format '.json' for vector data; valid: .npy, .csv, .txt"),
        ((run_dir, tmp_path / "s"), "unknown format '(none)'"),
        ((run_dir, tmp_path / "no" / "s.npy"), "does not exist"),
        ((tmp_path / "missing", tmp_path / "s.npy"), "no checkpoint"),
        ((corrupt, tmp_path / "s.npy"), "corrupt or not a pdiff checkpoint"),
        ((run_dir, tmp_path / "s.npy", "--sampling-timesteps", "6"),
         "sampling timesteps must be in 1..5"),
        ((run_dir, tmp_path / "s.npy", "--figure", str(tmp_path / "f.jpg")), "expected a .png"),
        ((run_dir, tmp_path / "s.npy", "--figure", str(figure)),
         f"figure {str(figure)!r} exists; pass --force"),
        ((run_dir, tmp_path / "s.npy", "--device", "tpu"), "unknown device 'tpu'; valid: cpu, cuda"),
    ]:
        code, _, err = sample(*args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert existing.read_bytes() == before
    assert figure.read_bytes() == b"an older figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "mine.npy", "old.png"]
    code, _, _ = sample(run_dir, existing, "--force")
    assert code == 0 and np.load(existing).shape == (10, 2)


def test_evaluate_checkpoint_reports_sample_metrics(run_dir, capsys):
    base = ["evaluate", "--checkpoint", str(run_dir), "--samples", "100",
            "--entropy-samples", "1000", "--json"]
    code, out, _ = run(base + ["--metric-samples", "50"], capsys)
    assert code == 0
    r = json.loads(out)
    assert r["metric_samples"] == 50 and r["num_samples"] == 100 and r["step"] == 20
    assert r["energy_distance"] > 0 and r["sliced_wasserstein"] > 0  # an untrained model is far off
    assert "_samples" not in r
    code, out, _ = run(base, capsys)
    assert code == 0 and json.loads(out)["metric_samples"] == 200  # default: the whole test split
    code, out, _ = run(base + ["--metric-samples", "0"], capsys)
    r = json.loads(out)
    assert code == 0 and not {"energy_distance", "sliced_wasserstein", "metric_samples"} & set(r)
    code, out, _ = run(base[:-1] + ["--metric-samples", "50"], capsys)
    assert code == 0 and "energy distance" in out and "sliced W2" in out
    code, _, err = run(base + ["--metric-samples", "201"], capsys)
    assert code == 2 and "metric samples (201) exceeds the run's test split (200 points)" in err


def test_evaluate_and_sample_device(run_dir, tmp_path, capsys):
    """``--device cpu`` is the default; a device the machine lacks, or none at all, exits 2."""
    base = ["evaluate", "--checkpoint", str(run_dir), "--samples", "50", "--entropy-samples", "500",
            "--metric-samples", "0", "--json"]
    code, plain, _ = run(base, capsys)
    code_cpu, on_cpu, _ = run(base + ["--device", "cpu"], capsys)
    assert code == code_cpu == 0 and json.loads(plain)["nll_nats"] == json.loads(on_cpu)["nll_nats"]
    bad = [("xpu9", "unknown device 'xpu9'; valid: cpu, cuda, cuda:N")]
    if not torch.cuda.is_available():
        bad.append(("cuda", "no CUDA device is available"))
    for device, message in bad:
        code, _, err = run(base + ["--device", device], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (device, err)
        code, _, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out",
                            str(tmp_path / "s.npy"), "--device", device], capsys)
        assert code == 2 and message in err and not (tmp_path / "s.npy").exists(), (device, err)
    code, _, err = run(["evaluate", "--data", "mixture1d", "--device", "cuda", *TINY], capsys)
    assert code == 2 and "--device applies to a trained network" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_and_sample_on_cuda_agree_with_the_cpu(run_dir, tmp_path, capsys):
    """The bound is the same function wherever it runs: on the same test points the per-example
    totals differ by their Monte Carlo noise only (different generators), so the two means agree
    within a few standard errors of their difference (the two means' errors combined, which over
    the same test points is conservative)."""
    base = ["evaluate", "--checkpoint", str(run_dir), "--samples", "200", "--entropy-samples", "500",
            "--metric-samples", "0", "--json"]
    cpu = json.loads(run(base, capsys)[1])
    gpu = json.loads(run(base + ["--device", "cuda"], capsys)[1])
    se = (cpu["nll_stderr"] ** 2 + gpu["nll_stderr"] ** 2) ** 0.5
    assert abs(cpu["nll_nats"] - gpu["nll_nats"]) < 5 * se
    code, _, _ = run(["sample", "--checkpoint", str(run_dir), "--num", "100", "--out",
                      str(tmp_path / "g.npy"), "--device", "cuda"], capsys)
    assert code == 0 and np.isfinite(np.load(tmp_path / "g.npy")).all()


def test_evaluate_stratified_estimator_and_memory_budget(capsys):
    args = ["evaluate", "--data", "clusters8", "--timesteps", "20", "--samples", "300",
            "--entropy-samples", "2000", "--json"]
    code, out, _ = run(args + ["--timestep-samples", "4", "--memory-budget", "8M"], capsys)
    assert code == 0
    r = json.loads(out)
    assert (r["estimator"], r["timestep_samples"], r["terms_nats"]) == ("stratified", 4, None)
    code, out, _ = run(args + ["--memory-budget", "1M"], capsys)
    r = json.loads(out)
    assert r["estimator"] == "all_terms" and len(r["terms_nats"]) == 20 and r["chunk_size"] >= 1
    for bad, message in ((["--timestep-samples", "20"], "at most T - 1 = 19"),
                         (["--memory-budget", "lots"], "expected a size"),
                         (["--memory-budget", "100T"], "--memory-budget")):
        try:
            code, _, err = run(args + bad, capsys)
        except SystemExit as e:  # argparse's refusal
            code, err = e.code, capsys.readouterr().err
        assert code == 2 and message in err


# -- pdiff sample --sampler ddim --eta, and v-prediction runs -------------------------------------

def test_sample_ddim_records_sampler_and_eta(run_dir, tmp_path, capsys):
    def sample(name, *extra):
        code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", "30", "--seed", "4",
                              "--out", str(tmp_path / name), *extra], capsys)
        assert code == 0, err
        return np.load(tmp_path / name), json.loads(out)

    x, r = sample("d.npy", "--sampler", "ddim", "--eta", "0", "--sampling-timesteps", "3")
    assert (r["sampler"], r["eta"], r["sampling_timesteps"]) == ("ddim", 0.0, 3)
    expected = draw_samples(load_run(run_dir), 30, seed=4, sampling_timesteps=3, sampler="ddim",
                            eta=0.0).numpy()
    np.testing.assert_array_equal(x, expected)
    default, r = sample("default.npy", "--sampler", "ddim", "--sampling-timesteps", "3")
    assert r["eta"] == 0.0 and np.array_equal(default, x)  # eta defaults to 0
    noisy, r = sample("noisy.npy", "--sampler", "ddim", "--eta", "1", "--sampling-timesteps", "3",
                      "--figure", str(tmp_path / "f.png"))
    assert r["eta"] == 1.0 and not np.array_equal(noisy, x)
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    ancestral, r = sample("a.npy")
    assert (r["sampler"], r["eta"]) == ("ddpm", None) and not np.array_equal(ancestral, noisy)


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "ddim", "--eta", "-1"], "--eta '-1': expected a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta 'nan': expected a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "inf"], "--eta 'inf': expected a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "one"], "--eta 'one': expected a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "100"], "eta must be at most"),
    (["--sampler", "foo"], "--sampler 'foo': unknown sampler; valid: ddpm, ddim"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["--sampler", "ddpm", "--eta", "0"], "--eta applies to --sampler ddim only"),
])
def test_sample_bad_sampler_or_eta_exit_2_in_one_line(run_dir, tmp_path, capsys, extra, message):
    path = tmp_path / "s.npy"
    code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out", str(path),
                          *extra], capsys)
    assert code == 2 and out == "" and not path.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_train_v_prediction_then_sample_with_ddim(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["train", "--data", "mixture1d", "--prediction", "v", "--objective", "hybrid",
                 "--variance", "learned_range", "--timesteps", "10", "--iterations", "20",
                 "--batch-size", "32", "--hidden", "16", "--depth", "1", "--train-size", "500",
                 "--test-size", "100", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    run_ = load_run(out)
    assert run_.config.prediction == "v" and run_.model.prediction == "v"
    for extra in ([], ["--sampler", "ddim", "--sampling-timesteps", "5"]):
        path = tmp_path / f"s{len(extra)}.npy"
        code, stdout, err = run(["sample", "--checkpoint", str(out), "--num", "20", "--out",
                                 str(path), *extra], capsys)
        assert code == 0, err
        assert np.load(path).shape == (20, 1) and np.isfinite(np.load(path)).all()
