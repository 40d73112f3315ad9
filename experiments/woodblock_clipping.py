"""A U-Net on a folder of woodblock-print-style images: its bound and its samples without and with
x_0 clipping.

A two-tone print has ink and paper and nothing between: its pixels sit at the ends of the range
[-1, 1], where a network's prediction of x_0 from a noisy x_t overshoots. Clipping that prediction
to [-1, 1] before it forms the mean of p(x_{t-1} | x_t) (``clip_denoised`` of Ho et al.'s and
Improved DDPM's code) keeps every step's target inside the data's range. One U-Net is trained on
the folder (T = 1000, linear schedule, L_hybrid with learned-range variances, base width 16, 3000
steps of 32 images of 32x32), then the same model is evaluated both ways:

- the bound in bits/dim on the held-out prints (discretized decoder, 256 levels), both chains on
  the same noise draws, so the change clipping makes is a paired difference with its standard
  error over the test prints;
- samples from the same noise both ways, each the decoder's mean at t = 1 (as Ho et al. show
  samples), which is the predicted x_0: the fraction of their pixels outside [-1, 1] before
  quantization (clipped, none can be) and their distance to all the held-out prints as saved
  images (rounded to the 256 levels): the energy distance between images as pixel vectors and the
  Wasserstein-1 distance between the pixel-value histograms, which two tones make bimodal;
- figures: held-out prints and both sample grids.

No woodblock prints ship with pdiff and none are downloaded. Without ``--data-dir`` the
experiment builds a STAND-IN folder under OUT/standin_prints_<size>px: scikit-learn's 1797 8x8
digits cut as relief prints, each an RGB PNG of the training size in two tones (black ink on cream
paper), with a keyline frame and the strokes crossed by carved gouge lines. The output says which
data it ran on. ``--data-dir`` takes a folder of real prints (any PNG/JPEG, resized and
centre-cropped to ``--image-size``, 10% held out).

Run from the repository root (about an hour of one CPU core; ``--device cuda`` on a GPU)::

    python experiments/woodblock_clipping.py --out runs/woodblock_clipping
    python experiments/woodblock_clipping.py --data-dir ~/prints --out runs/my_prints
    python experiments/woodblock_clipping.py --quick --out /tmp/woodblock  # smoke run
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a file (python experiments/woodblock_clipping.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import _pipeline as P  # noqa: E402
from pdiff.compare import draw_samples  # noqa: E402
from pdiff.data import load_images  # noqa: E402
from pdiff.distributions.discretized import quantize  # noqa: E402
from pdiff.elbo import full_bound  # noqa: E402
from pdiff.evaluation import chunk_for_budget  # noqa: E402
from pdiff.files import atomic_write, atomic_write_text  # noqa: E402
from pdiff.metrics import energy_distance  # noqa: E402
from pdiff.train import TrainConfig, load_run  # noqa: E402

NAME = "woodblock_clipping"
STANDIN = "standin_prints"
STANDIN_NOTE = "STANDIN.txt"  # written last: a folder without it is rebuilt
INK, PAPER = (0, 0, 0), (255, 248, 230)  # black ink, cream paper


def config(quick: bool = False, data_dir: str | None = None, image_size: int | None = None,
           **changes) -> TrainConfig:
    """The training: a U-Net of base width 16 on the folder at ``image_size`` (32 unless given;
    --quick 16), T = 1000, L_hybrid, learned-range variances, 3000 steps of 32; --quick: 20 steps
    of 8 with width 8, T = 100."""
    size = image_size or (16 if quick else 32)
    base = (dict(iterations=20, batch_size=8, channels=8, warmup=5, log_every=10, timesteps=100)
            if quick else dict(iterations=3000, batch_size=32, channels=16))
    return TrainConfig.for_data("folder", data_dir=data_dir, image_size=size, **(base | changes))


# -- the stand-in prints ---------------------------------------------------------------------------

def render_print(digit: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One 8x8 digit (levels 0..16) as a two-tone relief print, (size, size, 3) uint8: a keyline
    frame, the digit's strokes in ink, crossed by carved lines (paper) at a random phase and
    slant."""
    inner = size - 8
    up = torch.nn.functional.interpolate(torch.tensor(digit, dtype=torch.float32)[None, None] / 16,
                                         size=(inner, inner), mode="bilinear", align_corners=False)
    ink = np.zeros((size, size), dtype=bool)
    ink[4:4 + inner, 4:4 + inner] = up[0, 0].numpy() > 0.35
    yy, xx = np.mgrid[:size, :size]
    slant = rng.choice([-1, 1])
    ink &= (xx + slant * yy + rng.integers(4)) % 4 != 0  # the gouge lines cut in the strokes
    ink[[1, size - 2], 1:size - 1] = ink[1:size - 1, [1, size - 2]] = True  # the keyline
    return np.where(ink[..., None], np.array(INK, np.uint8), np.array(PAPER, np.uint8))


def build_standin(folder: Path, size: int) -> Path:
    """The stand-in folder (see the module docstring) at ``size`` x ``size``, built once: 1797
    PNGs and a note, so the loader keeps them two-tone (no resizing)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (folder / STANDIN_NOTE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, digit in enumerate(load_digits().images):
        img = Image.fromarray(render_print(digit, rng, size))
        atomic_write(folder / f"print_{i:04d}.png", lambda tmp: img.save(tmp, format="PNG"))
    atomic_write_text("Stand-in woodblock prints built by experiments/woodblock_clipping.py: "
                      "scikit-learn's 8x8 digits as two-tone relief prints, not real prints.\n",
                      folder / STANDIN_NOTE)
    return folder


# -- the evaluations -------------------------------------------------------------------------------

def bound_bits(run, x: torch.Tensor, *, clip: bool, seed: int) -> torch.Tensor:
    """The bound of each image of ``x`` in bits/dim, x_0 clipped or not; the noise draws depend
    on ``seed`` alone, so two calls differ only by the clipping."""
    model = run.model.replace(clip_x0=1.0) if clip else run.model
    x = x.to(run.device, torch.float32)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    with torch.no_grad():
        b = full_bound(model, x, chunk_size=chunk_for_budget(model, x, None), generator=gen)
    total = b.prior.double() + b.terms.double().sum(1)
    return (total / (x[0].numel() * math.log(2))).cpu()


def pixel_w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wasserstein-1 distance between the pixel values of ``a`` and ``b`` (on [-1, 1])."""
    qa = torch.quantile(a.flatten().double(), torch.linspace(0, 1, 1001, dtype=torch.float64))
    qb = torch.quantile(b.flatten().double(), torch.linspace(0, 1, 1001, dtype=torch.float64))
    return (qa - qb).abs().mean().item()


def mean_se(v: torch.Tensor) -> tuple[float, float | None]:
    v = v.double()
    return v.mean().item(), (v.std().item() / math.sqrt(len(v)) if len(v) > 1 else None)


def evaluate(run, test: torch.Tensor, held_out: torch.Tensor, *, samples: int, seed: int,
             levels: int) -> dict:
    """The bound both ways on ``test``, and ``samples`` samples both ways from the same noise
    against ``held_out``."""
    bits = {c: bound_bits(run, test, clip=c, seed=seed) for c in (False, True)}
    held_out = held_out.double()
    out = {"bound": {}, "samples": {}, "tensors": {}}
    for clip in (False, True):
        key = "clipped" if clip else "unclipped"
        m, se = mean_se(bits[clip])
        out["bound"][key] = {"bits_per_dim": m, "bits_per_dim_se": se}
        start = time.perf_counter()
        x = draw_samples(run, samples, seed=seed + 1, clip_denoised=clip,
                         noiseless_last_step=True)
        outside = (x.abs() > 1).flatten(1).double().mean(1)  # per sample
        saved = quantize(x, levels)  # as a PNG would hold them
        m, se = mean_se(outside)
        out["samples"][key] = {
            "outside_fraction": m, "outside_fraction_se": se,
            "max_abs": x.abs().max().item(),
            "energy_distance": energy_distance(saved.flatten(1), held_out.flatten(1)),
            "pixel_w1": pixel_w1(saved, held_out), "seconds": time.perf_counter() - start}
        out["tensors"][key] = saved
    diff = bits[True] - bits[False]
    m, se = mean_se(diff)
    out["bound"]["clipped_minus_unclipped"] = {"bits_per_dim": m, "bits_per_dim_se": se}
    return out


# -- the command line ------------------------------------------------------------------------------

def add_options(parser) -> None:
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="a folder of woodblock prints (PNG/JPEG); default: build the "
                             "stand-in prints under OUT/standin_prints_<size>px")
    parser.add_argument("--image-size", type=P.positive_int, default=None,
                        help="images resized and cropped to this square size (default 32; "
                             "--quick 16)")
    parser.add_argument("--eval-samples", type=P.positive_int, default=None,
                        help="held-out prints the bound is evaluated on (default 50; --quick 4)")
    parser.add_argument("--samples", type=P.positive_int, default=None,
                        help="samples drawn each way (default 128; --quick 8)")


def run(args, out: Path) -> tuple[str, list[Path]]:
    standin = args.data_dir is None
    size = args.image_size or (16 if args.quick else 32)
    if standin:
        if size < 12:
            raise ValueError(f"--image-size {size}: the stand-in prints need at least 12 pixels")
        folder = build_standin(out / f"{STANDIN}_{size}px", size)
    else:
        folder = Path(args.data_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--data-dir {args.data_dir!r}: no such folder; expected a folder of "
                             ".png/.jpg woodblock prints")
    cfg = config(args.quick, data_dir=str(folder.resolve()), image_size=size,
                 **P.overrides(args)).validate()
    data = load_images("folder", data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
    eval_n = min(args.eval_samples or (4 if args.quick else 50), len(data.test))
    n = args.samples or (8 if args.quick else 128)
    what = ("STAND-IN prints (scikit-learn's digits rendered as two-tone relief prints; not real "
            "woodblock prints)" if standin else f"the prints in {folder}")
    print(f"{NAME}: {len(data.train)} training and {len(data.test)} held-out images of {what}",
          file=sys.stderr, flush=True)
    training = P.train(cfg, out / P.RUN, resume=args.resume, force=args.force, log=sys.stderr)
    run_ = load_run(out / P.RUN, device=cfg.device)
    ev = evaluate(run_, data.test[:eval_n], data.test, samples=n, seed=args.seed,
                  levels=data.num_levels)
    figures = ([] if args.no_figures else
               _figures(out, data.test[:64], ev["tensors"], data.num_levels))
    doc = {"experiment": NAME, "command": args.command, "data": what, "standin": standin,
           "data_dir": cfg.data_dir, "num_train": len(data.train), "num_test": len(data.test),
           "config": asdict(cfg), "training": training, "eval_samples": eval_n, "samples": n,
           "uniform_bits_per_dim": math.log2(data.num_levels),
           "bound": ev["bound"], "sample_quality": ev["samples"],
           "figures": [f.relative_to(out).as_posix() for f in figures]}
    table = _table(ev, eval_n, n)
    md = "\n".join([f"# {NAME}: x_0 clipping on {what}", "", f"Command: `{args.command}`", "",
                    f"One U-Net, T = {cfg.timesteps} ({cfg.schedule}), {cfg.objective} / "
                    f"{cfg.variance}, {cfg.iterations} steps of {cfg.batch_size}, images "
                    f"{cfg.image_size}x{cfg.image_size}; bound on {eval_n} held-out images, "
                    f"{n} samples each way from the same noise.", "", table, "", NOTE, ""]
                   + (["Figures:", ""] + [f"- {f.relative_to(out).as_posix()}" for f in figures]
                      if figures else []))
    P.write_results(out, doc, md)
    return f"data: {what}\n\n{table}", figures


NOTE = ("bits/dim: the bound on held-out images (uniform over 256 levels: 8), mean ± standard "
        "error over the images; both chains share their noise draws, so the last line's change is "
        "paired. Outside: the percentage of sample pixels outside [-1, 1] before quantization (the "
        "decoder's mean at t = 1, the predicted x_0), mean ± standard error over samples; "
        "max abs(x) the largest. Energy distance (unbiased; about 0 for a perfect model) between "
        "samples and all held-out images as pixel vectors, pixel W1 between their pixel-value "
        "histograms, both on the samples rounded to the 256 levels as saved.")


def _table(ev: dict, eval_n: int, n: int) -> str:
    rows = []
    for key in ("unclipped", "clipped"):
        b, s = ev["bound"][key], ev["samples"][key]
        rows.append([key, P.fmt(b["bits_per_dim"], b["bits_per_dim_se"]),
                     P.fmt(100 * s["outside_fraction"], 100 * (s["outside_fraction_se"] or 0), 2),
                     P.fmt(s["max_abs"]), P.fmt(s["energy_distance"], None, 4),
                     P.fmt(s["pixel_w1"], None, 4)])
    d = ev["bound"]["clipped_minus_unclipped"]
    change = P.fmt(d["bits_per_dim"], d["bits_per_dim_se"], 4)
    return (P.markdown_table(["x_0", "bits/dim", "outside [-1, 1] (%)", "max abs(x)",
                              "energy distance", "pixel W1"], rows)
            + f"\n\nclipped minus unclipped bound: {change} bits/dim (paired over {eval_n} "
              f"held-out images); {n} samples each way")


def _figures(out: Path, test: torch.Tensor, samples: dict, levels: int) -> list[Path]:
    from pdiff.image_figures import plot_image_grid

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    made = [plot_image_grid(test, fig_dir / "data.png", num_levels=levels, title="held-out images")]
    for key, x in samples.items():
        made.append(plot_image_grid(x[:64], fig_dir / f"samples_{key}.png", num_levels=levels,
                                    title=f"samples, x_0 {key}"))
    return made


def main(argv: list[str] | None = None) -> int:
    return P.main(NAME, __doc__, add_options, run, argv)


if __name__ == "__main__":
    sys.exit(main())
