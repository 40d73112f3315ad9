"""Training on a user's own points: ``--data FILE`` (.npy, .csv, .txt), split once into training and
test parts, rescaled, with every NLL in the file's own units."""
import json
import math

import numpy as np
import pytest
import torch

from pdiff.cli import main
from pdiff.data import get_toy, toy_split
from pdiff.data.empirical import EmpiricalData

TINY = ["--iterations", "60", "--timesteps", "20", "--batch-size", "64", "--no-progress",
        "--objective", "simple", "--variance", "fixed_small"]


def points(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-2, 0.5, (n // 2, 2)), rng.normal(2, 1.0, (n - n // 2, 2))])


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".txt"])
def test_a_file_is_split_once_into_disjoint_parts(tmp_path, suffix):
    x = points()
    path = tmp_path / f"pts{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    else:
        np.savetxt(path, x, delimiter="," if suffix == ".csv" else " ")
    data = EmpiricalData(path)
    assert len(data.train) + len(data.test) == len(x) and len(data.test) == 100
    rows = {tuple(r) for r in np.round(data.train.numpy(), 6)}
    assert not rows & {tuple(r) for r in np.round(data.test.numpy(), 6)}
    for seed in (0, 5):  # the split does not depend on the run's seed
        train, test = toy_split(data, 10_000, 50, seed)
        torch.testing.assert_close(test.double(), data.test[:50])
        assert len(train) == len(data.train)
    # sampling (what the rescaling is fitted on) draws training rows only
    drawn = data.sample((500,), generator=torch.Generator().manual_seed(0))
    assert {tuple(r) for r in np.round(drawn.double().numpy(), 6)} <= rows


def test_nll_is_in_the_files_units(tmp_path, capsys):
    """Standardized, the points a x + b train the same model as x: the NLL differs by D log a."""
    x = points()
    a, b = 100.0, np.array([50.0, -7.0])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", a * x + b)
    nll = {}
    for name in ("x", "y"):
        out = tmp_path / f"run_{name}"
        assert main(["train", "--data", str(tmp_path / f"{name}.npy"), "--rescale", "standardize",
                     *TINY, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(out), "--samples", "100", "--json",
                     "--metric-samples", "0", "--no-progress"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["entropy_nats"] is None and r["num_samples"] == 100
        nll[name] = r["nll_nats"]
    assert nll["y"] - nll["x"] == pytest.approx(2 * math.log(a), abs=0.05)


def test_a_changed_file_is_refused_at_evaluation(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, points())
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), *TINY, "--out", str(out)]) == 0
    np.save(path, points(seed=1))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "50", "--no-progress"]) == 2
    assert "has changed since the run was trained" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]), "non-finite"),
    (np.array([[1.0, 2.0]]), "at least 2"),
])
def test_bad_files_are_refused(tmp_path, capsys, content, message):
    path = tmp_path / "bad.npy"
    if content is not None:
        np.save(path, content)
    out = tmp_path / "run"
    try:
        code = main(["train", "--data", str(path), *TINY, "--out", str(out)])
    except SystemExit as e:  # argparse: the file does not exist
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_get_toy_names_the_file_option():
    with pytest.raises(ValueError, match="or a file of points"):
        get_toy("nope")
