"""What the pipeline experiments share (``woodblock_clipping``, ``cifar10_guidance``): one model
trained, then evaluated under several sampling settings, where the grid experiments (``_common``)
compare trainings. The command line and the output folder behave as theirs do:

- ``--out DIR`` holding anything is refused unless ``--resume`` or ``--force``;
- ``--resume``: the run in ``OUT/run`` is reused when finished with the same options, else
  continued from its checkpoint; the evaluations are computed again;
- ``--force``: the run is trained again; the old run is replaced at the new one's first checkpoint
  (``pdiff.rundir``), results and figures as the new ones are written, nothing deleted first;
- results.json (strict JSON) and results.md written together atomically, the table printed;
- a mistake is one line on stderr and exit code 2; a training that fails is one line, exit 1.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from experiments._common import _positive_int as positive_int
from pdiff.compare import machine_info
from pdiff.files import atomic_write, atomic_write_text
from pdiff.runtime import tune_allocator
from pdiff.train import TrainConfig, Trainer, TrainingError

RUN = "run"  # the trained run's directory inside --out


def check_out(out: Path, *, resume: bool, force: bool) -> Path:
    """``out`` created and checked writable; a non-empty one refused unless resume or force."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or force):
        raise ValueError(f"output directory {str(out)!r} exists and is not empty; pass --resume "
                         "to reuse its run or --force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output directory {str(out)!r}: {e.strerror}") from None
    return out


def train(cfg: TrainConfig, run_dir: Path, *, resume: bool, force: bool, log) -> dict:
    """Train ``cfg`` into ``run_dir`` (or reuse / continue it under ``resume``); what it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg, run_dir, resume=resume, force=force)
    start = trainer.step
    if start < cfg.iterations:
        print(f"training {cfg.iterations - start} of {cfg.iterations} steps into {run_dir}",
              file=log, flush=True)
    last = trainer.train(progress=False)
    return {"trained_steps": trainer.step - start, "reused": start >= cfg.iterations,
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu, "final_loss": last.get("loss")}


def strict(obj):
    """``obj`` with every non-finite float as None: results.json is strict JSON (RFC 8259)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_results(out: Path, doc: dict, md: str) -> None:
    """results.json and results.md, the pair together: the Markdown is written inside the write of
    the JSON, which replaces the old file only once both are written."""
    doc = strict(doc | {"machine": machine_info()})

    def write_pair(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
        atomic_write_text(md, out / "results.md")

    atomic_write(out / "results.json", write_pair)


def fmt(value, se=None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def overrides(args) -> dict:
    """The training options given on the command line (None: the experiment's default)."""
    return {k: v for k, v in dict(iterations=args.iterations, timesteps=args.timesteps,
                                  channels=args.channels, batch_size=args.batch_size,
                                  seed=args.seed, device=args.device).items() if v is not None}


def main(name: str, doc: str, add_options: Callable[[argparse.ArgumentParser], None],
         run: Callable[[argparse.Namespace, Path], tuple[str, list[Path]]],
         argv: list[str] | None = None) -> int:
    """The experiment ``name`` from the command line ``argv``: ``run(args, out)`` trains,
    evaluates, writes the results and returns the table to print and the figures written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()  # as pdiff's command line does (pdiff.runtime)
    parser = argparse.ArgumentParser(prog=f"python experiments/{name}.py",
                                     description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--out", default=str(Path("runs") / name), metavar="DIR",
                        help=f"output directory (default: runs/{name})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (a narrow U-Net, 20 steps, T = 100, a few samples): "
                             "a smoke run, not results")
    parser.add_argument("--iterations", type=positive_int, default=None,
                        help="training steps (default: the experiment's)")
    parser.add_argument("--timesteps", type=positive_int, default=None,
                        help="T of the trained chain (default: 1000, --quick 100)")
    parser.add_argument("--channels", type=positive_int, default=None,
                        help="the U-Net's base width (default: the experiment's)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="training batch (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished run in --out, or continue an unfinished one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    parser.add_argument("--no-figures", action="store_true", help="write no figures")
    add_options(parser)
    args = parser.parse_args(argv)
    args.command = " ".join(["python", f"experiments/{name}.py"] + [shlex.quote(a) for a in argv])
    try:
        out = check_out(Path(args.out), resume=args.resume, force=args.force)
        started = time.perf_counter()
        table, figures = run(args, out)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:
        print(f"{name}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the run is kept in {Path(args.out) / RUN}: rerun with "
              "--resume to continue it", file=sys.stderr)
        return 130
    print(table)
    print(f"\n{time.perf_counter() - started:.0f} s; results: {out / 'results.md'}, "
          f"{out / 'results.json'}" + (f"; figures: {out / 'figures'}" if figures else ""))
    return 0

