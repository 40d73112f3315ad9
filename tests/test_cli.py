"""The command line: a smoke run of every command on tiny settings, and every user mistake answered
with a clear one-line error and exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pdiff.cli import main
from pdiff.data import get_toy

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
