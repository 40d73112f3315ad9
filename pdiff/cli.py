"""The ``pdiff`` command line. A user's mistake gives a one-line error and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from .data import RESCALINGS, TOY_DATASETS, GaussianMixture, check_data, entropy_mc, fit_rescaling, get_toy
from .data.toy import toy_split
from .distributions import DECODER_VARIANCES, FIXED_VARIANCES, VARIANCES
from .nets import EMBEDDINGS
from .objectives import OBJECTIVES, SAMPLERS
from .parameterization import PREDICTIONS
from .evaluation import BoundReport, bound_report
from .train import ENGINES, TrainConfig, Trainer, TrainingError, load_run
from .oracle import MixtureDenoiser
from .schedules import SCHEDULES, NoiseSchedule, make_schedule
from .distributions.reverse import ReverseProcess

DENOISERS = ("oracle",)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _load_array(path: str) -> torch.Tensor:
    """An array from a .npy file or a whitespace/comma-separated text file, one example a row."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file {path!r} does not exist")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            arr = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except (ValueError, OSError) as e:
        raise UserError(f"could not read {path!r} (.npy or numeric text expected): {e}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path!r} holds {arr.dtype} values, expected numbers")
    return torch.as_tensor(arr, dtype=torch.float64)


def _oracle_model(args, data):
    if args.data is None:
        raise UserError("--data is required with --denoiser oracle (or give --checkpoint DIR)")
    if not isinstance(data, GaussianMixture):
        mixtures = sorted(k for k, f in TOY_DATASETS.items() if isinstance(f(), GaussianMixture))
        raise UserError(f"the oracle denoiser needs Gaussian-mixture data; {args.data!r} is not one "
                        f"(valid with --denoiser oracle: {', '.join(mixtures)})")
    if args.variance not in FIXED_VARIANCES:
        raise UserError(f"the oracle predicts only the mean; --variance must be one of "
                        f"{', '.join(FIXED_VARIANCES)}, got {args.variance!r}")
    if args.betas:
        schedule = NoiseSchedule.from_betas(_load_array(args.betas).flatten())
    else:
        schedule = make_schedule(args.schedule, args.timesteps)
    rescaling = fit_rescaling(args.rescale, data, data.event_shape[0])
    model = ReverseProcess(MixtureDenoiser(rescaling.mixture(data), schedule), schedule,
                           prediction="x0", variance=args.variance,
                           decoder_variance=args.decoder_variance)
    config = {"data": args.data, "denoiser": "oracle",
              "schedule": "file:" + args.betas if args.betas else args.schedule,
              "timesteps": schedule.num_timesteps, "variance": args.variance,
              "decoder_variance": args.decoder_variance, "rescale": args.rescale}
    return model, rescaling, config, None


def _checkpoint_model(args):
    run = load_run(args.checkpoint)
    cfg = run.config
    config = asdict(cfg) | {"denoiser": "checkpoint", "checkpoint": str(args.checkpoint),
                            "step": run.step}
    _, test = toy_split(get_toy(cfg.data), 0, cfg.test_size, cfg.seed)
    if args.samples > cfg.test_size:
        raise UserError(f"--samples {args.samples} exceeds the run's test split ({cfg.test_size} points)")
    return run.model, run.rescaling, config, test[: args.samples]


def cmd_evaluate(args) -> int:
    if args.checkpoint:
        model, rescaling, config, x = _checkpoint_model(args)
        data = get_toy(config["data"])
        dtype = torch.float32
    else:
        torch.set_default_dtype(torch.float64)  # the oracle is analytic: evaluate it in float64
        data = get_toy(args.data) if args.data else None
        model, rescaling, config, x = _oracle_model(args, data)
        dtype = torch.float64
    dim = data.event_shape[0]
    if args.data_file:
        x = check_data(_load_array(args.data_file), dim, what=f"data in {args.data_file!r}")
    elif x is None:
        _, x = toy_split(data, 0, args.samples, args.seed)
    entropy = entropy_mc(data, args.entropy_samples,
                         generator=torch.Generator().manual_seed(args.seed + 1_000_003))
    with torch.no_grad():
        report = bound_report(model, rescaling.apply(x).to(dtype), log_jacobian=rescaling.log_abs_det,
                              entropy=entropy, chunk_size=args.chunk_size,
                              generator=torch.Generator().manual_seed(args.seed))
    config["seed"] = args.seed
    print(json.dumps(report.to_dict() | config) if args.json else _summary(report, config))
    return 0


def _summary(r: BoundReport, cfg: dict) -> str:
    lines = [f"{cfg['data']}: {cfg['denoiser']} denoiser, {cfg['schedule']} schedule, T = "
             f"{cfg['timesteps']}, variance {cfg['variance']}, decoder variance "
             f"{cfg['decoder_variance']}, rescale {cfg['rescale']}, {r.num_samples} test points",
             f"  bound on -log p(x):  {r.nll_nats:.4f} +- {r.nll_stderr:.4f} nats "
             f"({r.bits_per_dim:.4f} bits/dim, D = {r.dim})",
             f"  prior term L_T:      {r.prior_nats:.3g} nats",
             f"  decoder term L_0:    {r.terms_nats[0]:.4f} nats",
             f"  transition terms:    {sum(r.terms_nats[1:]):.4f} nats (sum of L_1..L_{{T-1}})"]
    if r.log_jacobian_nats:
        lines.append(f"  rescaling log-Jacobian: {r.log_jacobian_nats:.4f} nats (subtracted)")
    if r.entropy_nats is not None:
        lines.append(f"  data entropy:        {r.entropy_nats:.4f} +- {r.entropy_stderr:.4f} nats; "
                     f"gap {r.gap_nats:.4f} +- {r.gap_stderr:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="every term of the variational bound on test data")
    ev.add_argument("--checkpoint", metavar="DIR", help="evaluate a trained run (its test split)")
    ev.add_argument("--data", choices=sorted(TOY_DATASETS), metavar="NAME",
                    help=f"dataset, one of: {', '.join(sorted(TOY_DATASETS))}")
    ev.add_argument("--data-file", help="evaluate on these points (.npy, .csv or text, N x D) "
                    "instead of a test split drawn from the dataset")
    ev.add_argument("--denoiser", choices=DENOISERS, default="oracle",
                    help="oracle: the Bayes-optimal E[x0|xt] of a Gaussian-mixture dataset")
    ev.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    ev.add_argument("--timesteps", type=_positive_int, default=1000, help="T, the number of steps")
    ev.add_argument("--betas", metavar="FILE", help="beta_1..beta_T from a .npy or text file "
                    "(overrides --schedule and --timesteps)")
    ev.add_argument("--variance", default="fixed_large", metavar="NAME",
                    help=f"reverse variance; with the oracle one of {', '.join(FIXED_VARIANCES)}")
    ev.add_argument("--decoder-variance", choices=DECODER_VARIANCES, default="beta_tilde2",
                    help="sigma_1^2 at the decoder step under fixed variances")
    ev.add_argument("--rescale", choices=RESCALINGS, default="none",
                    help="diffuse rescaled data; the NLL is still reported in the data's units")
    ev.add_argument("--samples", type=_positive_int, default=4000, help="test points")
    ev.add_argument("--entropy-samples", type=_positive_int, default=100_000,
                    help="Monte Carlo draws for the data entropy")
    ev.add_argument("--chunk-size", type=_positive_int, default=65536,
                    help="(example, step) pairs evaluated at once; bounds the memory")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train a denoiser on a toy dataset into a run directory")
    tr.add_argument("--out", required=True, metavar="DIR", help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    choices = {"data": sorted(TOY_DATASETS), "objective": OBJECTIVES, "variance": VARIANCES,
               "prediction": PREDICTIONS, "schedule": SCHEDULES, "decoder_variance": DECODER_VARIANCES,
               "sampler": SAMPLERS, "rescale": RESCALINGS, "net": ("mlp", "mean_variance"),
               "embedding": EMBEDDINGS, "engine": ENGINES}
    for f in fields(TrainConfig):
        kw = {"default": f.default, "help": f"(default: {f.default})"}
        if f.name in choices:
            kw["choices"] = choices[f.name]
        elif isinstance(f.default, int):
            kw["type"] = int
        elif isinstance(f.default, float):
            kw["type"] = float
        tr.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    tr.set_defaults(func=cmd_train)
    return parser


def cmd_train(args) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    trainer = Trainer(cfg, args.out, resume=args.resume, force=args.force)
    try:
        last = trainer.train(progress=not args.no_progress)
    except TrainingError as e:
        print(f"pdiff train: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "step": trainer.step} | last))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, category, *_: f"pdiff {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except (UserError, ValueError) as e:
        print(f"pdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
