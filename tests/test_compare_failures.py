"""``pdiff compare`` when things go wrong: a bad grid value refused before anything is written,
worker processes that die with a killed command, Ctrl-C in one line with exit code 130, and a
full disk reported in one line with the old files intact."""
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import default_sigint
import torch

from pdiff import compare as C
from pdiff.cli import main
from pdiff.compare import GridSpec, run_grid
from tests.test_compare import TINY_ARGS, cli, tiny

ROOT = Path(__file__).resolve().parents[1]
ONE_RUN = ["--objectives", "simple", "--variances", "fixed_large", "--seeds", "1", "--jobs", "1",
           "--no-figures"]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


# -- grid values -----------------------------------------------------------------------------------

def _without(args: list[str], *options: str) -> list[str]:
    """``args`` less the ``--option value`` pairs named (the grid sets them instead)."""
    out = list(args)
    for option in options:
        i = out.index(option)
        del out[i:i + 2]
    return out


@pytest.mark.parametrize("grid, option, message", [
    ("lr=-1,1e-3", None, "lr -1.0: lr must be"),
    ("lr=nan", None, "lr nan: lr must be"),
    ("lr=1e-3,inf", None, "lr inf: lr must be"),
    ("weight_decay=nan", None, "weight_decay nan: weight_decay must be"),
    ("timesteps=0", "--timesteps", "timesteps 0: timesteps must be >= 1"),
    ("warmup=5,-1", "--warmup", "warmup -1: warmup must be"),
    ("schedule=nonsense", None, "schedule 'nonsense': unknown schedule 'nonsense'; valid: linear"),
    # a value is part of its runs' directory names: a path in it would nest them
    ("data_dir=a/b,c", None, "cannot vary 'data_dir'"),
    # sizes that cannot fit: refused before the first run, not one failed run each
    ("timesteps=5,1000000000000", "--timesteps", "timesteps 1000000000000: a schedule of T"),
    ("batch_size=16,1000000000000", "--batch-size", "batch_size 1000000000000: a training batch"),
])
def test_a_bad_grid_value_exits_2_in_one_line_before_anything_is_written(
        tmp_path, capsys, grid, option, message):
    out = tmp_path / "out"
    args = _without(TINY_ARGS, option) if option else TINY_ARGS
    code, stdout, err = cli(["compare", "--out", str(out), *ONE_RUN, *args, "--grid", grid], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("pdiff compare: error: ") and message in err
    assert not out.exists() and stdout == ""


def test_a_bad_grid_value_leaves_an_existing_comparison_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs" / "simple-fixed_large-s0").mkdir(parents=True)
    (out / "results.json").write_text('{"mine": 1}')
    before = _snapshot(out)
    code, _, err = cli(["compare", "--out", str(out), *ONE_RUN, *TINY_ARGS, "--resume",
                        "--grid", "lr=1e-3,-2"], capsys)
    assert code == 2 and "lr -2.0: lr must be" in err
    assert _snapshot(out) == before


# -- a full disk -----------------------------------------------------------------------------------

@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk("results.json")``: writing the temporary file of a file of that name fails as on
    a full disk, after part of it is written (``atomic_write`` must remove it)."""
    names = set()

    def check(target) -> None:
        if any(Path(target).name.startswith(name + ".") for name in names):
            Path(target).write_bytes(b"half of it")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    write_text, save = Path.write_text, torch.save

    def fake_write_text(self, *args, **kw):
        check(self)
        return write_text(self, *args, **kw)

    def fake_save(obj, f, *args, **kw):
        check(f)
        return save(obj, f, *args, **kw)

    monkeypatch.setattr(Path, "write_text", fake_write_text)
    monkeypatch.setattr(torch, "save", fake_save)
    return names.add


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-run comparison (rerun with --resume, its run is reused)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["compare", "--out", str(out), *ONE_RUN, *TINY_ARGS]) == 0
    return out


@pytest.mark.parametrize("name", ["results.json", "results.md"])
def test_a_full_disk_fails_in_one_line_and_keeps_the_old_results(finished, full_disk, capsys, name):
    out = finished
    before = _snapshot(out)
    full_disk(name)
    code, _, err = cli(["compare", "--out", str(out), *ONE_RUN, *TINY_ARGS, "--resume"], capsys)
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pdiff compare: error: could not write {str(out / name)!r}: "
                           "No space left on device; the comparison failed")
    assert "--resume" in last
    assert _snapshot(out) == before  # the old file whole, no temporary left beside it


def test_figures_on_a_full_disk_fail_in_one_line(finished, monkeypatch, capsys):
    def no_space(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere.png.x1y2.tmp")
    monkeypatch.setattr(C, "comparison_figures", no_space)
    with_figures = [a for a in ONE_RUN if a != "--no-figures"]
    code, _, err = cli(["compare", "--out", str(finished), *with_figures, *TINY_ARGS, "--resume"],
                       capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"pdiff compare: error: could not write {str(finished / 'figures')!r}: No space left on "
        "device")


@pytest.mark.parametrize("name", [C.EVAL_FILE, C.SAMPLES_FILE])
def test_a_run_whose_files_cannot_be_written_is_reported_failed(tmp_path, full_disk, name):
    """Not dropped in silence: the run is failed with the path, and --resume evaluates it again."""
    full_disk(name)
    spec = GridSpec(tiny(variance="fixed_large"), {"objective": ("simple",)}, (0,),
                    eval_samples=50, metric_samples=50)
    [record] = run_grid(spec, tmp_path, jobs=1)
    run_dir = tmp_path / "runs" / "simple-s0"
    assert record["status"] == "failed"
    assert f"could not write {str(run_dir / name)!r}: No space left on device" in record["error"]
    assert not (run_dir / name).exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


# -- killed and interrupted ------------------------------------------------------------------------

def test_resume_starts_over_a_run_interrupted_before_its_first_checkpoint(tmp_path, monkeypatch):
    """What the interrupted line tells the user to do works for every run: one stopped before it
    had a checkpoint has nothing to continue from, and is trained from the start."""
    class Interrupted(C.Trainer):
        def save(self):
            raise KeyboardInterrupt

    spec = GridSpec(tiny(variance="fixed_large"), {"objective": ("simple",)}, (0,),
                    eval_samples=50, metric_samples=0)
    monkeypatch.setattr(C, "Trainer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, tmp_path, jobs=1)
    assert (tmp_path / "runs" / "simple-s0").is_dir()
    monkeypatch.undo()
    [record] = run_grid(spec, tmp_path, jobs=1, resume=True)
    assert record["status"] == "ok", record.get("error")
    assert record["trained_steps"] == 20



# settings that keep each run training far longer than a test waits
LONG_ARGS = ["--data", "mixture1d", "--timesteps", "5", "--iterations", "10000000",
             "--batch-size", "32", "--train-size", "500", "--test-size", "200", "--hidden", "16",
             "--depth", "1", "--log-every", "5", "--checkpoint-every", "10000000", "--warmup", "5",
             "--eval-samples", "50", "--metric-samples", "50", "--no-figures",
             "--objectives", "simple,vlb", "--variances", "fixed_large", "--seeds", "2"]
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="finds worker processes through /proc (Linux)")


def _children(pid: int) -> set[int]:
    kids = set()
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids |= {int(k) for k in f.read_text().split()}
        except OSError:
            pass
    return kids


def _workers(pid: int) -> set[int]:
    """The pool's worker processes among ``pid``'s children (not multiprocessing's tracker)."""
    out = set()
    for k in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.add(k)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    """Running, or stopped: not gone, and not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _training(out: Path) -> int:
    """How many runs are in their training loop (they have logged)."""
    return sum(1 for p in (out / "runs").glob("*/metrics.jsonl") if p.stat().st_size > 0)


@pytest.fixture
def launch(tmp_path):
    """``launch(jobs)``: ``pdiff compare`` started in its own session, as a terminal starts it;
    whatever is left of its process group is killed at the end."""
    started = []

    def start(jobs: int):
        err = open(tmp_path / f"stderr{len(started)}", "w+")
        out = tmp_path / f"out{len(started)}"
        proc = subprocess.Popen([sys.executable, "-m", "pdiff.cli", "compare", "--out", str(out),
                                 "--jobs", str(jobs), *LONG_ARGS], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=default_sigint)
        started.append((proc, err))
        return proc, out, err

    yield start
    for proc, err in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        err.close()


@needs_proc
def test_workers_die_with_a_killed_compare(launch):
    proc, out, _ = launch(2)
    assert _wait_for(lambda: _training(out) == 2)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_for(lambda: not any(_alive(w) for w in workers), timeout=10), \
        "worker processes outlived the killed pdiff compare"


@needs_proc
@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_compare_in_one_line(launch, jobs):
    """Ctrl-C reaches the whole foreground process group: the command and its workers."""
    proc, out, err = launch(jobs)
    assert _wait_for(lambda: _training(out) == jobs)
    workers = _workers(proc.pid)
    assert len(workers) == (jobs if jobs > 1 else 0)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err.seek(0)
    text = err.read()
    assert "Traceback" not in text and "Error" not in text and "Warning" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"pdiff compare: interrupted; finished runs are kept in {out}"), text
    assert "--resume" in last
    assert not any(_alive(w) for w in workers)


@needs_proc
def test_ctrl_c_while_the_workers_start_is_no_traceback(launch):
    """A worker that gets SIGINT while it imports torch, before its initializer ignores SIGINT,
    neither dies nor prints a traceback: it was spawned with SIGINT held. (Sent to the workers
    alone, so that this does not race with the parent ending them.)"""
    proc, out, err = launch(2)
    assert _wait_for(lambda: len(_workers(proc.pid)) == 2, timeout=60)
    for w in _workers(proc.pid):
        os.kill(w, signal.SIGINT)
    assert _wait_for(lambda: _training(out) == 2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err.seek(0)
    text = err.read()
    assert "Traceback" not in text and "FAILED" not in text, text


def test_a_non_finite_evaluation_is_a_failed_run_and_the_results_stay_strict_json(
        tmp_path, monkeypatch, capsys):
    """A run whose bound or sample metric came out NaN used to be 'ok', its NaN written into
    results.json as a bare NaN token (not JSON)."""
    import json

    real = C.evaluate_run

    def nan_for_vlb(run, **kw):
        report = real(run, **kw)
        if run.config.objective == "vlb":
            report["energy_distance"] = float("nan")
        return report
    monkeypatch.setattr(C, "evaluate_run", nan_for_vlb)
    out = tmp_path / "out"
    code, _, err = cli(["compare", "--out", str(out), "--objectives", "simple,vlb", "--variances",
                        "fixed_large", "--seeds", "1", "--jobs", "1", "--no-figures", *TINY_ARGS],
                       capsys)
    assert code == 0  # one run of two is ok
    reject = lambda token: pytest.fail(f"results.json holds {token}")  # noqa: E731
    doc = json.loads((out / "results.json").read_text(), parse_constant=reject)
    status = {r["name"]: r["status"] for r in doc["runs"]}
    assert status == {"simple-fixed_large-s0": "ok", "vlb-fixed_large-s0": "failed"}
    failed = next(r for r in doc["runs"] if r["status"] == "failed")
    assert "energy_distance is NaN or infinite" in failed["error"]
    json.loads((out / "runs" / "vlb-fixed_large-s0" / "eval.json").read_text(),
               parse_constant=reject)
