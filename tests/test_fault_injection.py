"""Fault injection: ``pdiff train`` killed with SIGKILL at random moments, some of them in the middle
of a checkpoint write. After every kill each file of the run is valid (config.json parses, the
checkpoint passes its checksum, every metrics line but a last partial one parses), and resuming
gives the uninterrupted run bit for bit: the same weights and the same metrics log (it/s aside,
the one wall-clock field), with no temporary file and no process left behind."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pdiff.checkpoint import read_checkpoint
from pdiff.train import CHECKPOINT, TrainConfig, Trainer

CFG = dict(data="mixture1d", timesteps=50, iterations=240, batch_size=64, hidden=256, depth=4,
           train_size=2000, test_size=200, log_every=10, checkpoint_every=25, warmup=5, seed=3)
ARGV = [a for k, v in CFG.items() for a in ("--" + k.replace("_", "-"), str(v))]
RANDOM_KILLS, KILLS_IN_A_WRITE = 5, 3


def start(out):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pdiff.cli", "train", *ARGV, "--no-progress",
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def kill_at_random(out, delay):
    proc = start(out)
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    return proc


def kill_in_a_checkpoint_write(out):
    """SIGKILL as soon as a checkpoint's temporary file is seen (it lives for a few ms)."""
    proc = start(out)
    seen = False
    while proc.poll() is None and not seen:
        seen = out.is_dir() and any(n.startswith(CHECKPOINT + ".") for n in os.listdir(out))
        if seen:
            proc.kill()
        else:
            time.sleep(0.0002)
    proc.wait(timeout=60)
    return proc, seen


def in_process_float32():
    """The command line's numerics in this process: float32 default, one thread (conftest)."""
    torch.set_default_dtype(torch.float32)


def metrics(out):
    return [{k: v for k, v in json.loads(ln).items() if k != "it_per_s"}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]


def check_files_valid(out):
    if not out.exists():
        return
    if (out / "config.json").exists():
        assert isinstance(json.loads((out / "config.json").read_text()), dict)
    if (out / CHECKPOINT).exists():
        read_checkpoint(out / CHECKPOINT)  # raises on a damaged one
    if (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().split("\n")
        for line in lines[:-1]:  # every complete line parses; the last may be cut short
            json.loads(line)


def test_kills_at_random_points_then_resume_bit_identical(tmp_path):
    in_process_float32()
    cfg = TrainConfig(**CFG)
    Trainer(cfg, tmp_path / "whole").train(progress=False)
    whole = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=False)
    rng = random.Random(14)
    trials = [("random", rng.uniform(1.0, 9.0)) for _ in range(RANDOM_KILLS)]
    trials += [("write", None)] * KILLS_IN_A_WRITE
    hits = 0
    for i, (kind, delay) in enumerate(trials):
        out = tmp_path / f"trial{i}"
        if kind == "random":
            proc = kill_at_random(out, delay)
        else:
            proc, seen = kill_in_a_checkpoint_write(out)
            hits += seen
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read()
        check_files_valid(out)
        if out.exists() and any(n != ".pdiff.lock" for n in os.listdir(out)):
            # a run killed before its first checkpoint starts over (--force), else --resume
            trainer = Trainer(cfg, out, resume=True, force=not (out / CHECKPOINT).exists())
        else:
            trainer = Trainer(cfg, out)
        trainer.train(progress=False)
        state = torch.load(out / CHECKPOINT, weights_only=False)
        assert state["step"] == cfg.iterations
        for name in ("net", "ema"):
            assert all(torch.equal(state[name][k], whole[name][k]) for k in whole[name]), (kind, delay)
        assert metrics(out) == metrics(tmp_path / "whole"), (kind, delay)
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert hits >= 1, "no kill landed inside a checkpoint write"


@pytest.mark.parametrize("when", ["before the first checkpoint", "after it"])
def test_a_killed_force_leaves_the_old_run_or_the_new_one(tmp_path, when):
    """--force over an existing run, killed: OUT holds the old run whole, or (once the new run has
    a checkpoint) the new one; the staging directory is cleaned up by the next start."""
    in_process_float32()
    out = tmp_path / "run"
    old_cfg = TrainConfig(**(CFG | {"seed": 1, "iterations": 30}))
    Trainer(old_cfg, out).train(progress=False)
    old = (out / CHECKPOINT).read_bytes()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pdiff.cli", "train", *ARGV, "--no-progress",
                             "--out", str(out), "--force"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staged = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".run.pdiff-new")]  # noqa
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if when == "before the first checkpoint" and staged():
            break
        if when == "after it" and (out / CHECKPOINT).read_bytes() != old:
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait(timeout=60)
    check_files_valid(out)
    saved = read_checkpoint(out / CHECKPOINT)
    assert saved["config"]["seed"] == (1 if when == "before the first checkpoint" else CFG["seed"])
    if when == "before the first checkpoint":
        assert (out / CHECKPOINT).read_bytes() == old
    Trainer(TrainConfig(**CFG), out, force=True).train(progress=False)
    assert not staged()
