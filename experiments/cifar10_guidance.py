"""Class-conditional CIFAR-10 with classifier-free guidance, and sampling with another schedule
and fewer steps.

One class-conditional U-Net is trained with label dropout (each label replaced by the null label
with probability 0.1, so the network is both p(x | y) and p(x); Ho & Salimans 2022), T = 1000,
linear schedule, L_hybrid with learned-range variances, pdiff's U-Net for the image size: on
CIFAR-10 20,000 steps of 128 at Ho et al.'s learning rate 2e-4 (they train 800,000), on MNIST 5000
of 128, on the digits 2000 of 64. Then, on the same model:

- the bound in bits/dim of p(x) (the null label) on held-out images;
- for each guidance scale w (default 0, 1, 3; eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null), w = 0
  the conditional model as trained), samples of every class in turn: their Fréchet distance,
  precision and recall against as many held-out images, and their class accuracy (the fraction
  the classifier labels as the class asked for) with its binomial standard error. Guidance trades
  diversity (recall) for fidelity to the class (accuracy, precision);
- at one scale (``--sampler-guidance``, default 1), the trained T-step ancestral chain against
  DDIM (eta = 0) on T/20 evenly respaced steps and against ancestral sampling on the cosine
  schedule with T/10 steps (each step run at the training step of nearest log-SNR): the same
  numbers, and the seconds each took;
- the reference: held-out images against as many training images (the Fréchet distance of the
  data itself at this sample size) and the classifier's test accuracy.

The features and the classifier are pdiff's FeatureNet, trained once per dataset and cached beside
the data (pdiff.feature_net; on the digits, in $PDIFF_CACHE or ~/.cache/pdiff): a Fréchet distance
on them is comparable across these rows, not with Inception FIDs in papers.

The CIFAR-10 python batches are not downloaded: ``--data-dir`` is the folder holding
``cifar-10-batches-py/`` (data_batch_1..5, test_batch) from
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted. ``--data digits`` (no files)
or ``--data mnist`` (the IDX files in ``--data-dir``) runs the same study on those.

Run from the repository root (CIFAR-10 needs a GPU: ``--device cuda``)::

    python experiments/cifar10_guidance.py --data-dir ~/data --device cuda --out runs/cifar10
    python experiments/cifar10_guidance.py --data digits --out runs/digits_guidance
    python experiments/cifar10_guidance.py --data digits --quick --out /tmp/guidance  # smoke run
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a file (python experiments/cifar10_guidance.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments import _pipeline as P  # noqa: E402
from pdiff.compare import draw_samples, evaluate_run  # noqa: E402
from pdiff.data import load_images  # noqa: E402
from pdiff.data.images import CIFAR_FILES, CIFAR_FOLDER, CIFAR_URL  # noqa: E402
from pdiff.feature_net import accuracy, feature_net_for, to_grid  # noqa: E402
from pdiff.sample_quality import sample_quality  # noqa: E402
from pdiff.train import TrainConfig, load_run  # noqa: E402

NAME = "cifar10_guidance"
DATASETS = ("cifar10", "digits", "mnist")
GUIDANCE = (0.0, 1.0, 3.0)
# (name, sampler, sampling schedule, steps as a fraction of T): the trained chain first
SAMPLERS = (("ancestral, trained chain", "ddpm", None, 1),
            ("DDIM (eta 0), respaced", "ddim", None, 1 / 20),
            ("ancestral, cosine schedule", "ddpm", "cosine", 1 / 10))
# per dataset: training (U-Net width 0: pdiff's size for the image size), samples per setting,
# held-out images for the bound
FULL = {"cifar10": (dict(iterations=20_000, batch_size=128, lr=2e-4, warmup=500), 1000, 100),
        "mnist": (dict(iterations=5000, batch_size=128), 1000, 100),
        "digits": (dict(iterations=2000, batch_size=64), 300, 100)}


def config(quick: bool = False, data: str = "cifar10", data_dir: str | None = None,
           **changes) -> TrainConfig:
    """The class-conditional training on ``data``: label dropout 0.1, T = 1000, linear schedule,
    L_hybrid with learned-range variances; --quick: 20 steps of a narrow U-Net, T = 100."""
    base = (dict(iterations=20, batch_size=8, channels=8, warmup=5, log_every=10, timesteps=100)
            if quick else FULL[data][0])
    return TrainConfig.for_data(data, data_dir=data_dir, class_cond=True, label_dropout=0.1,
                                **(base | changes))


def check_data(data: str, data_dir: str | None) -> None:
    """A clear error before anything is trained when the data's files cannot be there (the
    loader names a missing or damaged file in a folder that exists)."""
    if data == "digits":
        if data_dir is not None:
            raise ValueError("--data digits reads no files (scikit-learn's): drop --data-dir")
        return
    where = (f"the folder holding {CIFAR_FOLDER}/ ({', '.join(CIFAR_FILES)}), extracted from "
             f"{CIFAR_URL}" if data == "cifar10" else "the folder holding the four MNIST IDX files")
    if data_dir is None:
        raise ValueError(f"--data {data} needs --data-dir: {where}")
    if not Path(data_dir).expanduser().is_dir():
        raise ValueError(f"--data-dir {data_dir!r}: no such folder; expected {where}")


def measure(run, fn, test: torch.Tensor, levels: int, n: int, *, seed: int, guidance: float,
            sampler: str = "ddpm", schedule: str | None = None,
            steps: int | None = None) -> tuple[dict, torch.Tensor]:
    """``n`` samples, class k mod 10 for the k-th, guided by ``guidance``: sample quality against
    ``test[:n]`` and class accuracy under ``fn``'s classifier."""
    labels = torch.arange(n) % run.model.net.num_classes
    start = time.perf_counter()
    x = draw_samples(run, n, seed=seed, labels=labels, guidance=guidance, sampler=sampler,
                     sampling_schedule=schedule, sampling_timesteps=steps)
    seconds = time.perf_counter() - start
    q = sample_quality(x, test[:n].double(), fn)
    acc = accuracy(fn.net, to_grid(x, levels), labels)
    return ({"guidance": guidance, "sampler": sampler, "schedule": schedule or run.config.schedule,
             "steps": steps or run.model.num_timesteps, "fid": q["fid"],
             "precision": q["precision"], "recall": q["recall"], "class_accuracy": acc,
             "class_accuracy_se": math.sqrt(acc * (1 - acc) / n), "samples": n,
             "seconds": seconds}, x)


def add_options(parser) -> None:
    parser.add_argument("--data", default="cifar10", choices=DATASETS,
                        help="cifar10 (default), or the same study on digits or mnist")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"cifar10: the folder holding {CIFAR_FOLDER}/; mnist: the IDX files")
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE), metavar="W",
                        help="guidance scales (default 0 1 3)")
    parser.add_argument("--sampler-guidance", type=float, default=1.0, metavar="W",
                        help="the scale the samplers are compared at (default 1)")
    parser.add_argument("--samples", type=P.positive_int, default=None,
                        help="samples per setting, against as many held-out images (default 1000; "
                             "digits 300; --quick 16)")
    parser.add_argument("--eval-samples", type=P.positive_int, default=None,
                        help="held-out images the bound is evaluated on (default 100; --quick 4)")


def run(args, out: Path) -> tuple[str, list[Path]]:
    scales = list(dict.fromkeys(args.guidance))
    if any(not (math.isfinite(w) and w >= 0) for w in scales + [args.sampler_guidance]):
        raise ValueError(f"guidance scales must be finite and >= 0, got "
                         f"{scales + [args.sampler_guidance]}")
    check_data(args.data, args.data_dir)
    data_dir = None if args.data_dir is None else str(Path(args.data_dir).expanduser().resolve())
    cfg = config(args.quick, args.data, data_dir, **P.overrides(args)).validate()
    if cfg.timesteps < 20:
        raise ValueError(f"--timesteps {cfg.timesteps}: the samplers take T/20 steps, so T >= 20")
    data = load_images(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
    n = min(args.samples or (16 if args.quick else FULL[cfg.data][1]), len(data.test),
            len(data.train))
    eval_n = min(args.eval_samples or (4 if args.quick else FULL[cfg.data][2]), len(data.test))
    if n < 4:
        raise ValueError(f"{n} samples: precision and recall need at least 4")
    training = P.train(cfg, out / P.RUN, resume=args.resume, force=args.force, log=sys.stderr)
    run_ = load_run(out / P.RUN, device=cfg.device)
    print(f"{NAME}: the feature classifier of {cfg.data}, then the bound on {eval_n} held-out "
          f"images and {n} samples per setting", file=sys.stderr, flush=True)
    fn = feature_net_for(cfg.data, cfg.data_dir, data=data)
    K, T = data.num_levels, cfg.timesteps
    ref = sample_quality(data.train[:n].double(), data.test[:n].double(), fn)
    reference = {"fid": ref["fid"], "precision": ref["precision"], "recall": ref["recall"],
                 "test_accuracy": fn.info["test_accuracy"], "features": ref["features"]}
    ev = evaluate_run(run_, samples=eval_n, seed=cfg.seed)
    bound = {"bits_per_dim": ev["bits_per_dim"], "num_images": eval_n,
             "bits_per_dim_se": (None if ev["nll_stderr"] is None else
                                 ev["nll_stderr"] / (ev["dim"] * math.log(2)))}
    seed, images = cfg.seed + 1, {}
    guided = []
    for w in scales:
        row, images[f"w{w:g}"] = measure(run_, fn, data.test, K, n, seed=seed, guidance=w)
        guided.append(row)
    samplers = []
    for name, sampler, schedule, fraction in SAMPLERS:
        steps = None if fraction == 1 else max(1, round(T * fraction))
        w = args.sampler_guidance
        same = next((r for r in guided if r["guidance"] == w), None) if fraction == 1 else None
        if same is None:
            same, x = measure(run_, fn, data.test, K, n, seed=seed, guidance=w, sampler=sampler,
                              schedule=schedule, steps=steps)
            images[f"{sampler}_{schedule or cfg.schedule}_{steps or T}"] = x
        samplers.append({"name": name} | same)
    figures = [] if args.no_figures else _figures(out, data.test[:100], images, K,
                                                  run_.model.net.num_classes)
    doc = {"experiment": NAME, "command": args.command, "data": cfg.data, "data_dir": cfg.data_dir,
           "config": asdict(cfg), "training": training, "bound": bound, "reference": reference,
           "guidance": guided, "samplers": samplers,
           "figures": [f.relative_to(out).as_posix() for f in figures]}
    table = _tables(bound, reference, guided, samplers, n)
    md = "\n".join([f"# {NAME}: classifier-free guidance on {cfg.data}", "",
                    f"Command: `{args.command}`", "",
                    f"One class-conditional U-Net (label dropout {cfg.label_dropout}), T = {T} "
                    f"({cfg.schedule}), {cfg.objective} / {cfg.variance}, {cfg.iterations} steps "
                    f"of {cfg.batch_size}; features: {reference['features']}.", "", table, "",
                    NOTE, ""] + (["Figures:", ""] + [f"- {f.relative_to(out).as_posix()}"
                                                     for f in figures] if figures else []))
    P.write_results(out, doc, md)
    return table, figures


NOTE = ("bits/dim: the bound of p(x) (the null label) on held-out images, ± its standard error. "
        "FID, precision and recall (k = 3): samples against as many held-out images on the "
        "classifier's features; class accuracy: the fraction of samples the classifier labels as "
        "the class they were drawn for, ± its binomial standard error. Every setting starts from "
        "the same noise. The data row compares held-out with training images: the FID floor at "
        "this sample size, and the classifier's test accuracy.")


def _tables(bound, reference, guided, samplers, n) -> str:
    cols = ["FID", "precision", "recall", "class accuracy"]

    def cells(r):
        return [P.fmt(r["fid"], None, 2), P.fmt(r["precision"]), P.fmt(r["recall"]),
                P.fmt(r["class_accuracy"], r["class_accuracy_se"])]
    data_row = ["data (held-out vs train)", P.fmt(reference["fid"], None, 2),
                P.fmt(reference["precision"]), P.fmt(reference["recall"]),
                P.fmt(reference["test_accuracy"])]
    first = P.markdown_table(["guidance w"] + cols + ["seconds"],
                             [[f"{r['guidance']:g}"] + cells(r) + [P.fmt(r["seconds"], None, 1)]
                              for r in guided] + [data_row + [""]])
    second = P.markdown_table(["sampler", "schedule", "steps", "w"] + cols + ["seconds"],
                              [[r["name"], r["schedule"], str(r["steps"]), f"{r['guidance']:g}"]
                               + cells(r) + [P.fmt(r["seconds"], None, 1)] for r in samplers])
    bits = P.fmt(bound["bits_per_dim"], bound["bits_per_dim_se"])
    return (f"bound of p(x): {bits} bits/dim on {bound['num_images']} held-out images; {n} "
            f"samples per setting\n\n{first}\n\n{second}")


def _figures(out: Path, test: torch.Tensor, images: dict, levels: int, classes: int) -> list[Path]:
    """Held-out images, and each setting's samples one class per row."""
    from pdiff.image_figures import plot_image_grid

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    made = [plot_image_grid(test, fig_dir / "data.png", num_levels=levels, title="held-out images")]
    for key, x in images.items():
        per = max(1, min(10, len(x) // classes))
        rows = [x[k::classes][:per] for k in range(classes)]  # sample i is of class i mod classes
        grid = torch.cat([r for r in rows if len(r) == per])
        made.append(plot_image_grid(grid, fig_dir / f"samples_{key}.png", num_levels=levels,
                                    nrow=per, title=f"samples {key}, one class per row"))
    return made


def main(argv: list[str] | None = None) -> int:
    return P.main(NAME, __doc__, add_options, run, argv)


if __name__ == "__main__":
    sys.exit(main())
