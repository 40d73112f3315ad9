"""The trainer under failure: nothing a user saved is lost, a refusal writes nothing, damaged run
files are named or repaired, every mistake is one line. Each test reproduces a reported failure."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from tests.conftest import default_sigint
import torch

from pdiff.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from pdiff.cli import main
from pdiff.rundir import RunInUse
from pdiff.train import CHECKPOINT, TrainConfig, Trainer, TrainingError, load_run

TINY = dict(data="mixture1d", timesteps=20, iterations=40, batch_size=32, hidden=16, depth=2,
            train_size=500, test_size=200, log_every=10, checkpoint_every=20, warmup=5)
CLI_TINY = ["--data", "mixture1d", "--timesteps", "20", "--iterations", "40", "--batch-size", "32",
            "--hidden", "16", "--depth", "2", "--train-size", "500", "--test-size", "200",
            "--log-every", "10", "--checkpoint-every", "20", "--warmup", "5", "--no-progress"]


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**(TINY | changes))


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(out):
    """The metric lines without it_per_s (wall-clock: the one field a rerun cannot reproduce)."""
    return [{k: v for k, v in json.loads(ln).items() if k != "it_per_s"}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def old_run(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(), out).train(progress=False)
    return out


# -- 1. --force replaces a run only once the new one works ----------------------------------------

@pytest.mark.parametrize("bad", [
    ["--data", "mnist", "--data-dir", "/nonexistent/typo"],  # the new data cannot be loaded
    ["--weight-decay", "nan"],                                # the optimizer would refuse it
    ["--batch-size", str(10**13)],                            # far more memory than there is
])
def test_force_with_a_bad_new_run_keeps_the_old_one(old_run, capsys, bad):
    before = snapshot(old_run)
    argv = ["train", *CLI_TINY, "--out", str(old_run), "--force", *bad]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
    assert snapshot(old_run) == before


def test_force_keeps_the_old_run_until_the_new_one_has_a_checkpoint(old_run):
    before = snapshot(old_run)
    trainer = Trainer(tiny(seed=1, checkpoint_every=30), old_run, force=True)

    def interrupt_at_25():
        if trainer.step == 25:
            raise KeyboardInterrupt
    real = trainer._update_ema
    trainer._update_ema = lambda: (interrupt_at_25(), real())
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.train(progress=False)
    assert "old run" in info.value.resume_hint and "untouched" in info.value.resume_hint
    assert snapshot(old_run) == before
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["run"]  # no staging left


def test_force_replaces_the_run_whole_at_its_first_checkpoint(old_run):
    (old_run / "eval.json").write_text("{}")  # compare's record of the old run goes with it
    Trainer(tiny(seed=1, iterations=20), old_run, force=True).train(progress=False)
    assert load_run(old_run).config.seed == 1
    assert sorted(p.name for p in old_run.iterdir()) == [CHECKPOINT, "config.json",
                                                         "metrics.jsonl"]
    assert [m["step"] for m in metrics(old_run)] == [10, 20]
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["run"]


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["train", *CLI_TINY, "--out", str(tmp_path), "--force"]) == 2
    assert "not a pdiff run" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


# -- 2. a refused command writes nothing ----------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (["--weight-decay", "-1"], "weight_decay"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--lr", "nan"], "lr must be"),
    (["--lr", "inf"], "lr must be"),
    (["--warmup", "-3"], "warmup"),
    (["--seed", str(2**70)], "seed must be"),
    (["--seed", "-1"], "seed must be"),
    (["--train-size", "0"], "train_size"),
    (["--timesteps", str(10**12)], "T = "),
    (["--train-size", str(10**12)], "training data"),
    (["--batch-size", str(10**12)], "training batch"),
    (["--data", "mnist", "--data-dir", "/nonexistent"], "mnist"),
])
def test_a_refused_train_writes_nothing(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    assert main(["train", *CLI_TINY, "--out", str(out), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_refused_resume_leaves_the_run_as_it_was(old_run, capsys):
    before = snapshot(old_run)
    assert main(["train", *CLI_TINY, "--iterations", "60", "--lr", "1e-4", "--out", str(old_run),
                 "--resume"]) == 2
    assert "differs in lr" in capsys.readouterr().err
    assert snapshot(old_run) == before


# -- 4. one trainer per run directory ------------------------------------------------------------

def test_a_second_trainer_in_a_live_run_is_refused(old_run, capsys):
    first = Trainer(tiny(iterations=60), old_run, resume=True)  # holds the run
    with pytest.raises(RunInUse, match=f"in use by process {os.getpid()}"):
        Trainer(tiny(iterations=60), old_run, resume=True)
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(old_run), "--resume"]) == 2
    assert "in use by process" in capsys.readouterr().err
    first.train(progress=False)  # it finishes, and releases the run
    Trainer(tiny(iterations=80), old_run, resume=True).train(progress=False)
    assert load_run(old_run).step == 80


# -- 6. damaged or odd run files ------------------------------------------------------------------

def test_resume_repairs_a_partial_metrics_line(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    Trainer(tiny(), whole).train(progress=False)
    Trainer(tiny(iterations=20), cut).train(progress=False)
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "loss": 0.1')  # a kill in the middle of a line
    Trainer(tiny(), cut, resume=True).train(progress=False)
    assert [m["step"] for m in metrics(cut)] == [10, 20, 30, 40]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text('{"data": "mixture1d",'), "config.json is damaged"),
    (lambda p: p.write_text("[1, 2]"), "config.json is damaged"),
    (lambda p: p.unlink(), "config.json is missing"),
])
def test_damaged_config_is_named(old_run, capsys, damage, message):
    damage(old_run / "config.json")
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(old_run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_without_a_checkpoint_does_not_start_over(old_run, capsys):
    (old_run / CHECKPOINT).unlink()
    before = snapshot(old_run)
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(old_run), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert snapshot(old_run) == before


def test_leftover_temporary_files_are_removed_on_the_next_start(old_run):
    (old_run / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    Trainer(tiny(iterations=60), old_run, resume=True).train(progress=False)
    assert not list(old_run.glob("*.tmp"))


def resave(out, change):
    """Rewrite ``out``'s checkpoint with ``change`` applied, its checksum made anew."""
    state = torch.load(out / CHECKPOINT, weights_only=False)
    state.pop("checksum")
    change(state)
    save_checkpoint(state, out / CHECKPOINT)


def test_a_checkpoint_missing_keys_is_named(old_run):
    resave(old_run, lambda s: s.pop("rescale_shift"))
    with pytest.raises(CheckpointError, match="lacks rescale_shift"):
        load_run(old_run)
    with pytest.raises(CheckpointError, match="lacks rescale_shift"):
        Trainer(tiny(iterations=60), old_run, resume=True)


def test_silent_corruption_is_caught_by_the_checksum(old_run):
    """Bytes changed inside a tensor's data leave a zip that torch loads without complaint."""
    path = old_run / CHECKPOINT
    data = bytearray(path.read_bytes())
    weights = torch.load(path, weights_only=False)["net"]
    needle = next(iter(weights.values())).numpy().tobytes()[:16]
    at = data.index(needle)  # the first stored weight's bytes, inside the archive
    data[at: at + 4] = b"\x00\x00\x80\x7f"  # +inf in place of a float32
    data[at + 8: at + 12] = b"\x00\x00\x20\x41"  # and 10.0
    path.write_bytes(bytes(data))
    state = torch.load(path, weights_only=False)  # torch itself sees nothing wrong
    assert state["step"] == 40
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(old_run)


def test_non_finite_weights_are_refused(old_run, capsys):
    def poison(state):
        next(iter(state["ema"].values())).fill_(float("nan"))
    resave(old_run, poison)
    with pytest.raises(CheckpointError, match="non-finite ema weights"):
        read_checkpoint(old_run / CHECKPOINT)
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(old_run), "--resume"]) == 2
    assert "non-finite" in capsys.readouterr().err


# -- 7. one line, not a traceback -----------------------------------------------------------------

def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("data")
    assert main(["train", *CLI_TINY, "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "data"


def test_a_full_disk_on_a_checkpoint_keeps_the_last_one(old_run, monkeypatch, capsys):
    before = (old_run / CHECKPOINT).read_bytes()

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(old_run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step 40" in err and err.count("\n") == 1
    assert (old_run / CHECKPOINT).read_bytes() == before
    assert not list(old_run.glob("*.tmp"))


# -- 8. messages that tell the truth ------------------------------------------------------------

def test_no_checkpoint_is_claimed_when_none_was_written(tmp_path):
    trainer = Trainer(tiny(checkpoint_every=30), tmp_path / "run")
    real = trainer._loss
    trainer._loss = lambda x0: real(x0) * float("nan")
    with pytest.raises(TrainingError, match="no checkpoint was written") as info:
        trainer.train(progress=False)
    assert "is kept" not in str(info.value)


def test_a_checkpoint_of_another_network_size_says_which(tmp_path, capsys):
    Trainer(tiny(), tmp_path / "a").train(progress=False)
    Trainer(tiny(hidden=8), tmp_path / "b").train(progress=False)
    (tmp_path / "a" / CHECKPOINT).write_bytes((tmp_path / "b" / CHECKPOINT).read_bytes())
    assert main(["train", *CLI_TINY, "--iterations", "60", "--out", str(tmp_path / "a"),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "hidden (saved 8, given 16)" in err and "corrupt" not in err

    def widen(state):  # a checkpoint whose own configuration says another width
        state["config"]["hidden"] = 32
    resave(tmp_path / "b", widen)
    with pytest.raises(ValueError, match=r"another size .*\(8, .*\(32, ") as info:
        load_run(tmp_path / "b")
    assert "corrupt" not in str(info.value)


# -- 9. the metrics log of a resumed run equals the uninterrupted one's -------------------------

@pytest.mark.parametrize("stop", [17, 25, 33])
def test_resumed_log_equals_the_uninterrupted_log(tmp_path, stop):
    """Checkpoints every 15 steps, log lines every 10: a checkpoint in the middle of a line."""
    cfg = tiny(iterations=50, checkpoint_every=15)
    Trainer(cfg, tmp_path / "a").train(progress=False)
    trainer = Trainer(cfg, tmp_path / "b")
    real = trainer._update_ema

    def stop_at():
        if trainer.step == stop:
            raise KeyboardInterrupt
        real()
    trainer._update_ema = stop_at
    with pytest.raises(KeyboardInterrupt):
        trainer.train(progress=False)
    Trainer(cfg, tmp_path / "b", resume=True).train(progress=False)
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    a, b = (torch.load(p / CHECKPOINT, weights_only=False) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


# -- 5. Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pdiff.cli", "train", *CLI_TINY, "--iterations", "1000000",
            "--checkpoint-every", "20", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if "warning" not in ln]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("pdiff train: interrupted; the last good checkpoint (step ")
    assert "--resume" in lines[0]
    assert load_run(out).step % 20 == 0


# -- 11. file modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_respect_the_umask(old_run, tmp_path, mask):
    from pdiff.files import atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_text("x", tmp_path / "new.txt")
        Trainer(tiny(), tmp_path / "r2").train(progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "new.txt", tmp_path / "r2" / CHECKPOINT, tmp_path / "r2" / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    (tmp_path / "new.txt").chmod(0o640)  # a file replaced keeps its mode
    atomic_write_text("y", tmp_path / "new.txt")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
