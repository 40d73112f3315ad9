"""The image pipeline experiments from their command lines, the numbers they print checked against
the ranges their theory gives: ``experiments/woodblock_clipping.py`` (the bound and samples with
and without x_0 clipping) and ``experiments/cifar10_guidance.py`` (classifier-free guidance, other
samplers; on the digits, and on a tiny CIFAR-10 folder written here in the real pickle format).

Each study runs once per module on small seeded settings (about 20 and 40 CPU seconds); the
ranges allow Z standard errors (tests/stats.py), each standard error the one the experiment prints.
"""
import contextlib
import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import cifar10_guidance, woodblock_clipping
from tests.stats import Z


def run_experiment(module, out, args):
    """``module.main`` with ``args`` into ``out`` in float32 as from the command line: (exit code,
    what it printed, results.json parsed strictly: a NaN or an infinity fails)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = module.main([*args, "--out", str(out)])
    finally:
        torch.set_default_dtype(old)
    path = out / "results.json"
    doc = (json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results"))
           if path.is_file() else None)
    return code, stdout.getvalue() + stderr.getvalue(), doc


# -- woodblock prints, x_0 clipping ----------------------------------------------------------------

# 200 steps of a narrow U-Net on 16x16 stand-in prints, T = 100: the bound 4.6 to 5.8 bits/dim
WOODBLOCK = ["--quick", "--iterations", "200", "--eval-samples", "32", "--samples", "32",
             "--no-figures"]


@pytest.fixture(scope="module")
def woodblock(tmp_path_factory):
    out = tmp_path_factory.mktemp("woodblock")
    code, printed, doc = run_experiment(woodblock_clipping, out, WOODBLOCK)
    assert code == 0, printed
    return out, printed, doc


def test_woodblock_bound_lies_between_zero_and_the_uniform_code(woodblock):
    """A bound on -log2 P(x) of discrete images is >= 0; a model that learned anything beats the
    uniform 8 bits/dim of 256 levels, clipped or not."""
    _, printed, doc = woodblock
    assert doc["uniform_bits_per_dim"] == 8.0 and "bits/dim" in printed
    for key in ("unclipped", "clipped"):
        b = doc["bound"][key]
        assert 0 < b["bits_per_dim"] - Z * b["bits_per_dim_se"]
        assert b["bits_per_dim"] + Z * b["bits_per_dim_se"] < 8, (key, b)


def test_clipping_keeps_every_sample_in_range_and_without_it_they_overshoot(woodblock):
    """Clipped, the decoder's mean at t = 1 is the clipped x_0: no pixel outside [-1, 1]. Unclipped,
    a two-tone print's x_0 predictions overshoot (what the study is about, and a check that the
    unclipped chain is not clipped too)."""
    s = woodblock[2]["sample_quality"]
    assert s["clipped"]["outside_fraction"] == 0 and s["clipped"]["max_abs"] <= 1
    assert s["unclipped"]["outside_fraction"] > 0 and s["unclipped"]["max_abs"] > 1
    for key in ("unclipped", "clipped"):
        assert math.isfinite(s[key]["energy_distance"]) and 0 <= s[key]["pixel_w1"] <= 2


def test_clipping_does_not_worsen_the_bound(woodblock):
    """The paired change of the bound, clipped minus unclipped, is at most Z of its standard
    errors above 0 (here clipping lowers it: the unclipped x_0 predictions lie off the range)."""
    d = woodblock[2]["bound"]["clipped_minus_unclipped"]
    assert d["bits_per_dim"] <= Z * d["bits_per_dim_se"], d


def test_the_stand_in_prints_are_two_tone_and_labelled_as_such(woodblock):
    out, printed, doc = woodblock
    assert doc["standin"] and "STAND-IN" in doc["data"] and "STAND-IN" in printed
    folder = out / "standin_prints_16px"
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 1797 and doc["num_train"] + doc["num_test"] == 1797
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3)
                             for p in paths[:50]])
    tones = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert tones == {woodblock_clipping.INK, woodblock_clipping.PAPER}


def test_a_folder_of_prints_given_by_data_dir(woodblock, tmp_path):
    """--data-dir: the folder's own images, not the stand-in (here the stand-in's PNGs)."""
    code, printed, doc = run_experiment(woodblock_clipping, tmp_path / "out",
                                        ["--quick", "--no-figures", "--data-dir",
                                         str(woodblock[0] / "standin_prints_16px")])
    assert code == 0, printed
    assert not doc["standin"] and "STAND-IN" not in printed and doc["num_test"] == 179
    assert not (tmp_path / "out" / "standin_prints_16px").exists()


def test_a_missing_print_folder_is_one_line_and_exit_code_2(tmp_path):
    code, printed, doc = run_experiment(woodblock_clipping, tmp_path / "out",
                                        ["--quick", "--data-dir", str(tmp_path / "nowhere")])
    assert code == 2 and doc is None
    assert printed.strip().count("\n") == 0 and "no such folder" in printed


def test_resume_reuses_the_finished_run_and_reproduces_its_numbers(woodblock):
    out, _, doc = woodblock
    code, printed, again = run_experiment(woodblock_clipping, out, [*WOODBLOCK, "--resume"])
    assert code == 0, printed
    assert again["training"]["reused"] and again["training"]["trained_steps"] == 0
    assert again["bound"] == doc["bound"]  # the same noise draws: the same numbers
    for key, s in again["sample_quality"].items():
        assert {k: v for k, v in s.items() if k != "seconds"} == {
            k: v for k, v in doc["sample_quality"][key].items() if k != "seconds"}


def test_a_used_out_directory_is_refused_and_kept(woodblock):
    """Without --resume or --force a finished study is not touched."""
    out = woodblock[0]
    before = (out / "results.json").read_bytes()
    code, printed, _ = run_experiment(woodblock_clipping, out, WOODBLOCK)
    assert code == 2 and "--resume" in printed and "--force" in printed
    assert (out / "results.json").read_bytes() == before


# -- classifier-free guidance ----------------------------------------------------------------------

# 300 steps of a 16-channel class-conditional U-Net on the digits, T = 100, 200 samples per setting
GUIDANCE = ["--data", "digits", "--iterations", "300", "--timesteps", "100", "--channels", "16",
            "--batch-size", "64", "--samples", "200", "--eval-samples", "20",
            "--guidance", "0", "3", "--sampler-guidance", "3", "--no-figures"]


@pytest.fixture(scope="module")
def guidance(tmp_path_factory):
    out = tmp_path_factory.mktemp("guidance")
    with pytest.MonkeyPatch.context() as mp:  # the digits' feature classifier, once a session
        mp.setenv("PDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "feature_cache"))
        code, printed, doc = run_experiment(cifar10_guidance, out / "study", GUIDANCE)
    assert code == 0, printed
    return printed, doc


def test_guidance_bound_lies_between_zero_and_the_uniform_code(guidance):
    """The bound of p(x) on the digits' 17 levels: above 0, below log2(17) bits/dim."""
    printed, doc = guidance
    b = doc["bound"]
    assert "bits/dim" in printed
    assert 0 < b["bits_per_dim"] - Z * b["bits_per_dim_se"]
    assert b["bits_per_dim"] + Z * b["bits_per_dim_se"] < math.log2(17), b


def test_guidance_raises_the_class_accuracy_of_the_samples(guidance):
    """w = 3 against w = 0, 200 samples each: the rise exceeds Z of its binomial standard errors."""
    rows = {r["guidance"]: r for r in guidance[1]["guidance"]}
    low, high = rows[0.0], rows[3.0]
    se = math.hypot(low["class_accuracy_se"], high["class_accuracy_se"])
    assert high["class_accuracy"] - low["class_accuracy"] > Z * se, (low, high)
    for r in rows.values():
        assert r["samples"] == 200 and r["fid"] >= 0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1


def test_fewer_steps_and_another_schedule_give_finite_sample_quality(guidance):
    """DDIM on T/20 respaced steps and ancestral sampling on the cosine schedule with T/10 steps,
    beside the trained 100-step chain (the w = 3 row reused)."""
    doc = guidance[1]
    chains = [(r["sampler"], r["schedule"], r["steps"]) for r in doc["samplers"]]
    assert chains == [("ddpm", "linear", 100), ("ddim", "linear", 5), ("ddpm", "cosine", 10)]
    assert doc["samplers"][0] == {"name": doc["samplers"][0]["name"]} | doc["guidance"][1]
    for r in doc["samplers"]:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["class_accuracy"] <= 1
    assert math.isfinite(doc["reference"]["fid"]) and doc["reference"]["test_accuracy"] > 0.9


def write_cifar(folder, rng, per_batch=10, test=20):
    """The six CIFAR-10 python batches (pickled dicts, protocol 2, bytes keys, rows of 1024 R, G,
    B values) holding images of class k: a square of colour k at a random place on noise."""
    folder.mkdir(parents=True)
    colours = rng.integers(0, 256, (10, 3))
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = np.arange(n) % 10
        img = rng.integers(0, 64, (n, 3, 32, 32))
        for i, k in enumerate(labels):
            r, c = rng.integers(0, 16, 2)
            img[i, :, r:r + 16, c:c + 16] = colours[k][:, None, None]
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                 b"data": img.astype(np.uint8).reshape(n, 3072),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_from_its_python_batches_end_to_end(tmp_path):
    """--quick on a tiny CIFAR-10 folder: trained, evaluated, its classifier cached there."""
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", np.random.default_rng(0))
    code, printed, doc = run_experiment(
        cifar10_guidance, tmp_path / "out",
        ["--quick", "--data-dir", str(tmp_path / "data"), "--samples", "8", "--guidance", "0", "1"])
    assert code == 0, printed
    assert doc["data"] == "cifar10" and doc["config"]["class_cond"]
    assert "bits/dim" in printed and 0 < doc["bound"]["bits_per_dim"]
    assert [r["guidance"] for r in doc["guidance"]] == [0.0, 1.0]
    assert all(math.isfinite(r["fid"]) for r in doc["guidance"] + doc["samplers"])
    assert list((tmp_path / "data").glob("feature_net_cifar10_3x32x32_*.pt"))
    assert {p.name for p in (tmp_path / "out" / "figures").iterdir()} >= {
        "data.png", "samples_w0.png", "samples_w1.png", "samples_ddim_linear_5.png",
        "samples_ddpm_cosine_10.png"}


@pytest.mark.parametrize("args, says", [
    ([], "--data-dir"),
    (["--data-dir", "MISSING"], "no such folder"),
    (["--data-dir", "EMPTY"], "data_batch_1"),
])
def test_missing_cifar10_files_are_named_with_where_to_get_them(tmp_path, args, says):
    (tmp_path / "empty").mkdir()
    args = [{"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}.get(a, a)
            for a in args]
    code, printed, doc = run_experiment(cifar10_guidance, tmp_path / "out", ["--quick", *args])
    assert code == 2 and doc is None and printed.strip().count("\n") == 0, printed
    assert says in printed and "cifar-10-python.tar.gz" in printed
    assert not (tmp_path / "out" / "run").exists()  # nothing trained
