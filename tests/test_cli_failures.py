"""The command line when things go wrong: a result that is not finite exits 1 with one line and
writes nothing, JSON output is always strict (RFC 8259), and a request too large, an output that
cannot be written or an option that does not apply is refused up front in one line."""
import errno
import json
import math

import numpy as np
import pytest
import torch

from pdiff.checkpoint import save_checkpoint
from pdiff.cli import main
from tests.test_compare import cli

TINY = ["--timesteps", "20", "--samples", "200", "--entropy-samples", "2000", "--seed", "0"]


run = cli  # (exit code, stdout, stderr) of pdiff's main, argparse's own refusals included


def strict_json(text: str) -> dict:
    """``text`` parsed as RFC 8259 JSON: NaN, Infinity and -Infinity are not JSON."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {text[:200]!r}")
    return json.loads(text, parse_constant=refuse)


def one_line_error(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, err)


def finite_numbers(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    return True


def save_points(path, x):
    np.save(path, np.asarray(x, dtype=np.float64))
    return str(path)


# -- runs to evaluate and sample from --------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run on 2-D data (T = 5), with a 200-point test split."""
    out = tmp_path_factory.mktemp("failures") / "run"
    assert main(["train", "--data", "clusters8", "--rescale", "standardize",
                 "--objective", "simple", "--variance", "fixed_large", "--timesteps", "5",
                 "--iterations", "10", "--batch-size", "32", "--hidden", "16", "--depth", "1",
                 "--train-size", "300", "--test-size", "200", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def _altered_run(run_dir, out, change):
    """A copy of ``run_dir`` whose network weights (and EMA weights) went through ``change``."""
    out.mkdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    state.pop("checksum", None)
    for key in ("net", "ema"):
        state[key] = {k: change(v) if v.is_floating_point() else v for k, v in state[key].items()}
    save_checkpoint(state, out / "checkpoint.pt")
    for name in ("config.json", "metrics.jsonl"):
        if (run_dir / name).is_file():
            (out / name).write_bytes((run_dir / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def nan_run(run_dir, tmp_path_factory):
    return _altered_run(run_dir, tmp_path_factory.mktemp("nan") / "run",
                        lambda w: torch.full_like(w, math.nan))


@pytest.fixture(scope="module")
def diverging_run(run_dir, tmp_path_factory):
    """Weights 1e30 times too large: the network's outputs, and so the chain, overflow float32."""
    return _altered_run(run_dir, tmp_path_factory.mktemp("diverging") / "run", lambda w: w * 1e30)


# -- 1. results that are not finite ------------------------------------------------------------------

@pytest.mark.parametrize("rescale", ["none", "standardize"])
@pytest.mark.parametrize("scale", [1e6, 1e25])
def test_oracle_bound_of_large_values_is_finite(tmp_path, capsys, rescale, scale):
    """Values whose squares overflow float32 (1e25) are still evaluated in float64: finite."""
    x = scale + np.random.default_rng(0).standard_normal((20, 1))
    code, out, err = run(["evaluate", "--data", "mixture1d", "--data-file",
                          save_points(tmp_path / "x.npy", x), "--rescale", rescale, "--json",
                          *TINY], capsys)
    assert code == 0, err
    r = strict_json(out)
    assert finite_numbers(r) and r["nll_nats"] > 0


@pytest.mark.parametrize("rescale", ["none", "standardize"])
def test_oracle_bound_that_overflows_float64_exits_1(tmp_path, capsys, rescale):
    x = np.full((5, 1), 1e200)
    for extra in ([], ["--json"]):
        code, out, err = run(["evaluate", "--data", "mixture1d", "--data-file",
                              save_points(tmp_path / "x.npy", x), "--rescale", rescale, *extra,
                              *TINY], capsys)
        assert code == 1 and out == ""
        one_line_error(err, "not finite", "nll_nats")


@pytest.mark.parametrize("scale", [1e6, 1e25])
def test_checkpoint_bound_of_large_values_is_finite(run_dir, tmp_path, capsys, scale):
    """The network runs in float32, the bound's arithmetic around it in float64: data whose
    squares overflow float32 still get a finite bound, as they do under the oracle."""
    x = scale + np.random.default_rng(0).standard_normal((20, 2))
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--data-file",
                          save_points(tmp_path / "x.npy", x), "--entropy-samples", "100",
                          "--metric-samples", "0", "--json"], capsys)
    assert code == 0, err
    r = strict_json(out)
    assert finite_numbers(r) and r["nll_nats"] > 0
    # L_T = 1/2 sum_i [ab_T z_i^2 - ab_T - log(1 - ab_T)] of the rescaled z: exact in float64
    from pdiff.train import load_run

    model_run = load_run(run_dir)
    z = model_run.rescaling.apply(torch.as_tensor(x))
    ab, log1m = model_run.model.schedule.final_alpha_bar
    prior = (0.5 * (ab * z * z - ab - log1m)).sum(-1).mean().item()
    assert r["prior_nats"] == pytest.approx(prior, rel=1e-9)


def test_nan_weights_are_refused_and_nothing_written(nan_run, tmp_path, capsys):
    """The checkpoint's loader refuses non-finite weights (a bad input, exit 2), before any result."""
    code, out, err = run(["evaluate", "--checkpoint", str(nan_run), "--samples", "20",
                          "--entropy-samples", "100", "--metric-samples", "0", "--json"], capsys)
    assert code == 2 and out == ""
    one_line_error(err, "non-finite")
    path = tmp_path / "s.npy"
    code, out, err = run(["sample", "--checkpoint", str(nan_run), "--num", "10", "--out", str(path)],
                         capsys)
    assert code == 2 and out == "" and not path.exists()
    one_line_error(err, "non-finite")


def test_diverging_chain_exits_1(diverging_run, tmp_path, capsys):
    old = tmp_path / "s.npy"
    np.save(old, np.arange(3.0))
    before = old.read_bytes()
    code, out, err = run(["sample", "--checkpoint", str(diverging_run), "--num", "10", "--out",
                          str(old), "--force"], capsys)
    assert code == 1 and out == "" and old.read_bytes() == before
    one_line_error(err, "10 of 10 samples are not finite", "diverged", "nothing written")
    code, out, err = run(["evaluate", "--checkpoint", str(diverging_run), "--samples", "20",
                          "--entropy-samples", "100", "--metric-samples", "20", "--json"], capsys)
    assert code == 1 and out == ""
    one_line_error(err, "not finite")


def test_one_test_point_has_no_standard_error(capsys, run_dir):
    """A standard error of one point is undefined: null in JSON, n/a in the summary."""
    code, out, err = run(["evaluate", "--data", "mixture1d", "--json", *TINY[:2], "--samples", "1",
                          "--entropy-samples", "100"], capsys)
    assert code == 0, err
    r = strict_json(out)
    assert r["nll_stderr"] is None and r["gap_stderr"] is None and math.isfinite(r["nll_nats"])
    code, out, err = run(["evaluate", "--data", "mixture1d", *TINY[:2], "--samples", "1",
                          "--entropy-samples", "100"], capsys)
    assert code == 0 and "n/a" in out, err
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--samples", "1",
                          "--entropy-samples", "100", "--metric-samples", "0", "--json"], capsys)
    assert code == 0, err
    assert strict_json(out)["nll_stderr"] is None


def test_entropy_needs_two_draws(capsys):
    code, _, err = run(["evaluate", "--data", "mixture1d", *TINY[:4], "--entropy-samples", "1"],
                       capsys)
    assert code == 2 and "--entropy-samples" in err and ">= 2" in err


def test_one_sample_prints_strict_json(run_dir, tmp_path, capsys):
    code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", "1", "--out",
                          str(tmp_path / "one.npy")], capsys)
    assert code == 0, err
    r = strict_json(out)
    assert r["std"] is None and len(r["mean"]) == 2


@pytest.mark.parametrize("w", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_guidance_exits_2(run_dir, tmp_path, capsys, w):
    path = tmp_path / "s.npy"
    code, _, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out", str(path),
                        f"--guidance={w}"], capsys)
    assert code == 2 and "--guidance" in err and "finite" in err and not path.exists(), err


@pytest.mark.parametrize("betas, message", [
    (np.full((2, 3), 0.1), "got shape (2, 3)"),
    (np.full((2, 2, 2), 0.1), "got shape (2, 2, 2)"),
    (np.array([0.1, 1e-300, 0.2]), "[1e-16, 1)"),
    (np.array([1e-17]), "[1e-16, 1)"),
])
def test_betas_file_must_be_one_row_of_valid_betas(tmp_path, capsys, betas, message):
    path = tmp_path / "betas.npy"
    np.save(path, betas)
    code, _, err = run(["evaluate", "--data", "mixture1d", "--betas", str(path), *TINY[2:]], capsys)
    assert code == 2
    one_line_error(err, message)


@pytest.mark.parametrize("shape", [(8,), (8, 1), (1, 8)])
def test_betas_file_as_a_row_or_a_column(tmp_path, capsys, shape):
    path = tmp_path / "betas.txt"
    np.savetxt(path, np.linspace(0.3, 0.7, 8).reshape(shape))
    code, out, err = run(["evaluate", "--data", "mixture1d", "--betas", str(path), "--json",
                          *TINY[2:]], capsys)
    assert code == 0, err
    assert strict_json(out)["timesteps"] == 8


# -- 2. one line where one line is promised -----------------------------------------------------------

@pytest.mark.parametrize("argv, what", [
    (["--samples", str(10**12)], "test points"),
    (["--entropy-samples", str(10**13)], "entropy"),
    (["--timesteps", str(10**12)], "T = "),
])
def test_evaluate_too_large_is_refused_with_the_figure(capsys, argv, what):
    base = ["evaluate", "--data", "mixture1d", "--samples", "100", "--entropy-samples", "100",
            "--timesteps", "10"]
    code, out, err = run(base + argv, capsys)
    assert code == 2 and out == ""
    one_line_error(err, what, "of memory", "is available")


def test_evaluate_checkpoint_data_file_too_large_for_memory(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pdiff.resources.available_memory", lambda: 1000)
    x = np.zeros((200, 2))
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--data-file",
                          save_points(tmp_path / "x.npy", x), "--metric-samples", "0"], capsys)
    assert code == 2 and out == ""
    one_line_error(err, "of memory")


def test_sample_too_many_is_refused_with_the_figure(run_dir, tmp_path, capsys):
    path = tmp_path / "s.npy"
    code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", str(10**12), "--out",
                          str(path)], capsys)
    assert code == 2 and out == "" and not path.exists()
    one_line_error(err, "samples", "of memory", "--num")


def test_sample_out_is_a_directory(run_dir, tmp_path, capsys):
    folder = tmp_path / "samples.npy"
    folder.mkdir()
    for extra in ([], ["--force"]):
        code, _, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out",
                            str(folder), *extra], capsys)
        assert code == 2 and folder.is_dir()
        one_line_error(err, "is a directory")


def test_sample_figure_is_a_directory(run_dir, tmp_path, capsys):
    folder = tmp_path / "figure.png"
    folder.mkdir()
    out = tmp_path / "s.npy"
    code, _, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out", str(out),
                        "--figure", str(folder), "--force"], capsys)
    assert code == 2 and not out.exists()
    one_line_error(err, "is a directory")


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_full_disk_exits_1_and_keeps_the_old_file(run_dir, tmp_path, capsys, monkeypatch, suffix):
    old = tmp_path / ("s" + suffix)
    old.write_bytes(b"the old samples")

    def full(fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    monkeypatch.setattr(np, "savetxt", full)
    code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out", str(old),
                          "--force"], capsys)
    assert code == 1 and out == ""
    one_line_error(err, "No space left on device", str(old))
    assert old.read_bytes() == b"the old samples"
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]  # no temporary file left


@pytest.mark.parametrize("seed", [str(2**63), str(2**70), "-1"])
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_seed_out_of_range_is_refused_at_parse_time(run_dir, tmp_path, capsys, seed, command):
    argv = (["evaluate", "--data", "mixture1d", *TINY[:6]] if command == "evaluate" else
            ["sample", "--checkpoint", str(run_dir), "--num", "5", "--out", str(tmp_path / "s.npy")])
    code, _, err = run(argv + ["--seed", seed], capsys)
    assert code == 2 and "0.." in err and str(2**63 - 1) in err
    assert "Traceback" not in err and not (tmp_path / "s.npy").exists()


def test_largest_seed_works(run_dir, tmp_path, capsys):
    seed = str(2**63 - 1)
    code, out, err = run(["evaluate", "--data", "mixture1d", *TINY[:6], "--seed", seed, "--json"],
                         capsys)
    assert code == 0, err
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--samples", "20",
                          "--entropy-samples", "100", "--metric-samples", "10", "--seed", seed],
                         capsys)
    assert code == 0, err
    code, out, err = run(["sample", "--checkpoint", str(run_dir), "--num", "5", "--out",
                          str(tmp_path / "s.npy"), "--seed", seed], capsys)
    assert code == 0, err


# -- 4. options that do not apply ------------------------------------------------------------------

@pytest.mark.parametrize("option", [
    ["--timesteps", "10"], ["--betas", "betas.txt"], ["--variance", "fixed_small"],
    ["--data", "clusters8"], ["--schedule", "linear"], ["--denoiser", "oracle"],
    ["--decoder-variance", "beta1"], ["--rescale", "none"],
])
def test_oracle_options_with_a_checkpoint_exit_2(run_dir, capsys, option):
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--samples", "20",
                          "--entropy-samples", "100", "--metric-samples", "0", *option], capsys)
    assert code == 2 and out == ""
    one_line_error(err, option[0], "--checkpoint")


def test_oracle_defaults_are_unchanged(capsys):
    code, out, err = run(["evaluate", "--data", "mixture1d", "--samples", "50",
                          "--entropy-samples", "100", "--json"], capsys)
    assert code == 0, err
    r = strict_json(out)
    assert (r["schedule"], r["timesteps"], r["variance"], r["decoder_variance"], r["rescale"],
            r["denoiser"]) == ("cosine", 1000, "fixed_large", "beta1", "none", "oracle")


def test_data_file_honours_samples(run_dir, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((30, 2))
    path = save_points(tmp_path / "x.npy", x)
    code, out, err = run(["evaluate", "--data", "clusters8", "--data-file", path, "--samples", "7",
                          "--json", *TINY[:2], "--entropy-samples", "100"], capsys)
    assert code == 0 and strict_json(out)["num_samples"] == 7, err
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--data-file", path,
                          "--samples", "7", "--entropy-samples", "100", "--metric-samples", "0",
                          "--json"], capsys)
    assert code == 0 and strict_json(out)["num_samples"] == 7, err
    code, out, err = run(["evaluate", "--data", "clusters8", "--data-file", path, "--json",
                          *TINY[:2], "--entropy-samples", "100"], capsys)  # default: all 30 rows
    assert code == 0 and strict_json(out)["num_samples"] == 30, err


def test_image_run_with_a_bad_test_split_is_refused_at_training_time(tmp_path, capsys):
    """Test images of another size than the training images, or none, would only fail when the run
    is evaluated: the training refuses them, in one line, before writing anything."""
    from tests.data.test_images import IDX_SIZES, idx_bytes

    rng = np.random.default_rng(0)
    for name, test_images, message in [
            ("other_size", rng.integers(0, 256, (IDX_SIZES["t10k"], 6, 6)), "(6, 6)"),
            ("empty", np.zeros((0, 8, 8)), "0 images")]:
        data = tmp_path / name
        data.mkdir()
        for stem, n in IDX_SIZES.items():
            images = rng.integers(0, 256, (n, 8, 8)) if stem == "train" else test_images
            (data / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(images, 2051))
            (data / f"{stem}-labels-idx1-ubyte").write_bytes(
                idx_bytes(rng.integers(0, 10, len(images)), 2049))
        out = tmp_path / f"run_{name}"
        code, _, err = run(["train", "--data", "mnist", "--data-dir", str(data), "--out", str(out),
                            "--iterations", "1", "--batch-size", "2", "--no-progress"], capsys)
        assert code == 2 and not out.exists()
        one_line_error(err, "t10k-images-idx3-ubyte", message)


def test_a_closed_stdout_is_not_a_traceback():
    """``pdiff evaluate --json | head -c1``: the reader is gone before the report is written."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "pdiff.cli", "evaluate", "--data", "clusters8",
                           "--timesteps", "5", "--samples", "50", "--entropy-samples", "100",
                           "--json"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
