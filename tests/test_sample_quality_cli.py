"""The Fréchet distance and precision/recall reported by pdiff evaluate and pdiff compare beside the
bound (image runs), with the classifier they were measured on."""
import json

import pytest

from pdiff.cli import main

UNET = ["--data", "digits", "--iterations", "3", "--batch-size", "8", "--channels", "8",
        "--timesteps", "20", "--no-progress"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_evaluate_reports_the_fid_with_its_features(tmp_path, capsys, cache):
    out = tmp_path / "run"
    assert main(["train", *UNET, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "2", "--fid-samples", "40",
                 "--sampling-timesteps", "5", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fid"] > 0 and 0 <= r["sample_precision"] <= 1 and 0 <= r["sample_recall"] <= 1
    assert r["fid_samples"] == 40 and r["fid_sampling_timesteps"] == 5
    # beside it, training images in place of the samples: a 3-step model is far above that floor
    assert 0 < r["fid_floor"] < r["fid"]
    assert "trained on digits" in r["fid_features"] and "test accuracy" in r["fid_features"]
    assert list(cache.glob("feature_net_digits_*.pt"))  # trained once, cached
    # the bound of the run's own T-step chain beside samples of fewer steps, in one call
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "2", "--fid-samples", "40",
                 "--fid-sampling-timesteps", "4", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fid_sampling_timesteps"] == 4 and r["sampling_timesteps"] is None
    assert main(["evaluate", "--checkpoint", str(out), "--fid-sampling-timesteps", "4"]) == 2
    assert "applies to the samples of --fid-samples" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out), "--fid-samples", "4",
                 "--fid-sampling-timesteps", "21"]) == 2
    assert "must be in 1..20" in capsys.readouterr().err


def test_the_fid_is_refused_for_vectors(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["train", "--data", "mixture1d", "--iterations", "2", "--timesteps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--fid-samples", "10"]) == 2
    assert "--fid-samples measures image samples" in capsys.readouterr().err


def test_compare_puts_the_fid_beside_the_bound(tmp_path, capsys, cache):
    out = tmp_path / "cmp"
    assert main(["compare", *[a for a in UNET if a != "--no-progress"], "--objectives", "simple",
                 "--variances", "fixed_small", "--seeds", "1", "--eval-samples", "2",
                 "--fid-samples", "30", "--no-figures", "--jobs", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FID" in table and "precision" in table
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"][0]["fid"] == pytest.approx(doc["runs"][0]["eval"]["fid"])
    # images draw no samples for the energy distance by default (T network passes each)
    assert "energy_distance" not in doc["runs"][0]["eval"]
