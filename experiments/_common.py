"""What every experiment shares: the tiny settings of ``--quick`` and the command line around
``pdiff.compare.compare``."""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pdiff.compare import GridSpec, compare, results_table
from pdiff.run_data import is_image_data
from pdiff.runtime import tune_allocator


def quick(spec: GridSpec) -> GridSpec:
    """``spec`` on tiny settings for a smoke run: every cell, one seed, a few steps on few points
    (for images, a narrow U-Net and four test images). T, the schedule, the data and the kind of
    network stay as they are."""
    if is_image_data(spec.base.data):  # a narrow U-Net and a few test images
        base = replace(spec.base, iterations=20, batch_size=8, channels=8, warmup=5, log_every=10)
        return replace(spec, base=base, seeds=spec.seeds[:1], eval_samples=4,
                       metric_samples=min(spec.metric_samples, 4))
    base = replace(spec.base, iterations=20, batch_size=32, train_size=500, test_size=100,
                   warmup=5, log_every=10)
    return replace(spec, base=base, seeds=spec.seeds[:1], eval_samples=50, metric_samples=50)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(name: str, doc: str, spec: Callable[[bool], GridSpec], argv: list[str] | None = None) -> int:
    """Run the experiment ``name`` (its grid from ``spec(quick)``) from the command line ``argv``:
    results into ``--out``, the table on stdout, a mistake as one line on stderr with exit
    code 2, exit code 1 if no run finished."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()  # as pdiff's command line does (pdiff.runtime)
    parser = argparse.ArgumentParser(prog=f"python experiments/{name}.py",
                                     description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--out", default=str(Path("runs") / name), metavar="DIR",
                        help=f"comparison directory (default: runs/{name})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (every cell, one seed, 20 steps): a smoke run, not results")
    parser.add_argument("--jobs", type=_positive_int, default=None,
                        help="runs trained at once in worker processes (default: the CPU count)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished runs in --out and continue unfinished ones")
    parser.add_argument("--force", action="store_true", help="overwrite an existing comparison in --out")
    parser.add_argument("--no-figures", action="store_true", help="write no figures")
    args = parser.parse_args(argv)
    command = " ".join(["python", f"experiments/{name}.py"] + [shlex.quote(a) for a in argv])
    try:
        result = compare(spec(args.quick), args.out, jobs=args.jobs, resume=args.resume,
                         force=args.force, figures=not args.no_figures, command=command,
                         log=sys.stderr)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(results_table(result.rows, image=is_image_data(result.spec.base.data)))
    out = Path(args.out)
    print(f"\nresults: {out / 'results.md'}, {out / 'results.json'}"
          + (f"; figures: {out / 'figures'}" if result.figures else ""))
    return 0 if any(r["ok"] for r in result.rows) else 1
