"""The ``pdiff`` command line. A user's mistake gives a one-line error and exit code 2."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from .data import (RESCALINGS, TOY_DATASETS, GaussianMixture, check_data, entropy_mc, fit_rescaling,
                   get_toy, has_exact_density)
from .data.arrays import load_array, load_betas
from .data.toy import toy_split
from .distributions import DECODER_VARIANCES, FIXED_VARIANCES, VARIANCES
from .objectives import OBJECTIVES
from .compare import draw_samples, evaluate_run
from .evaluation import LIKELIHOODS, nonfinite_fields, bound_bytes, bound_report, other_likelihoods
from .resources import require_memory
from .sampling import SAMPLING_METHODS
from .run_data import is_image_data, test_points
from . import distributed
from .runtime import set_threads, threads_note, tune_allocator
from .train import (IMAGE_DEFAULTS, PRECISIONS, TrainConfig, Trainer, TrainingError,
                    check_device, load_run, wrap_precision)
from .oracle import MixtureDenoiser
from .schedules import SCHEDULES, NoiseSchedule, make_schedule, spaced_steps
from .distributions.reverse import ReverseProcess

DENOISERS = ("oracle",)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


class RunFailed(Exception):
    """The command ran but its result is not usable (a non-finite bound, NaN samples): reported in
    one line, exit code 1; nothing is written."""


def _bytes(text: str) -> int:
    """A memory size: bytes, or a number with K, M, G or T (powers of 1024), such as 512M."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = body[-1:] if body[-1:] in units and body[-1:] else ""
    try:
        value = float(body[: len(body) - len(unit)]) * units[unit]
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1 << 20):
        raise argparse.ArgumentTypeError(f"expected a size of at least 1M such as 512M or 2G, "
                                         f"got {text!r}")
    return int(value)


def _check_bound_options(args, T: int) -> None:
    """--sampling-timesteps K in 1..T; --timestep-samples in 1..K - 1 of the chain evaluated; an
    explicit --memory-budget that the machine has."""
    K = args.sampling_timesteps
    if K is not None and K > T:
        raise UserError(f"--sampling-timesteps {K}: at most T = {T}")
    steps = K or T
    if args.timestep_samples is not None and args.timestep_samples > max(steps - 1, 1):
        raise UserError(f"--timestep-samples {args.timestep_samples}: at most T - 1 = {steps - 1} "
                        "(the steps 2..T it samples from; omit it for every term)")
    if args.memory_budget is not None:
        require_memory(args.memory_budget, f"--memory-budget {args.memory_budget >> 20}M",
                       hint="give a smaller --memory-budget")
    others = [name for name in args.likelihood if name != "bound"]
    if others:
        discrete_only = [flag for flag, given in (("--sampling-timesteps", K is not None),
                                                  ("--clip-denoised", bool(args.clip_denoised)))
                         if given]
        if discrete_only:
            raise UserError(f"{', '.join(discrete_only)} applies to the discrete bound; the "
                            f"{' and '.join(others)} likelihood takes the model on its training "
                            "chain (drop one of them)")
    if "ode" not in args.likelihood and (given := _given(args, ODE_OPTIONS)):
        given = [flag.replace("--", "--ode-", 1) for flag in given]  # dest rtol is --ode-rtol
        raise UserError(f"{_applies(given)} to --likelihood ode")
    if "continuous" not in args.likelihood and args.continuous_samples is not None:
        raise UserError("--continuous-samples applies to --likelihood continuous")


def _ode_options(args) -> dict:
    """The ODE solver's options given on the command line (the rest at ``ode_nll``'s defaults)."""
    return {name: getattr(args, name) for name in ODE_OPTIONS if getattr(args, name) is not None}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# Seeds derived from a seed (2 seed + 1 for a test split, seed + 1_000_003 for the entropy's draws)
# stay within what torch.Generator.manual_seed takes, 0..2**64 - 1.
SEED_MAX = 2**63 - 1


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in low..high (``high`` None: no upper end)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            valid = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"expected {valid}, got {text!r}")
        return value
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan, inf, 1e400
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _load_array(path: str) -> torch.Tensor:
    """``data.arrays.load_array``, its refusal a ``UserError``."""
    try:
        return load_array(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_betas(path: str) -> torch.Tensor:
    """``data.arrays.load_betas``, its refusal a ``UserError``."""
    try:
        return load_betas(path)
    except ValueError as e:
        raise UserError(str(e)) from None


# evaluate's options of the oracle denoiser and their defaults: None on the command line means not
# given, so that one given with --checkpoint (which has its own) is refused
ORACLE_DEFAULTS = {"denoiser": "oracle", "schedule": "cosine", "timesteps": 1000,
                   "variance": "fixed_large", "decoder_variance": "beta1", "rescale": "none"}
ORACLE_OPTIONS = ("data", "denoiser", "schedule", "timesteps", "betas", "variance",
                  "decoder_variance", "rescale")
CHECKPOINT_OPTIONS = ("metric_samples", "data_dir", "clip_denoised", "fid_samples",
                      "fid_sampling_timesteps")
ODE_OPTIONS = ("rtol", "atol", "probes", "divergence", "u_start")
DEFAULT_CONTINUOUS_SAMPLES = 16
DEFAULT_EVAL_SAMPLES = 4000
# an image's bound costs T U-Net passes (MNIST, T = 1000: about 20 s on one CPU core)
DEFAULT_IMAGE_EVAL_SAMPLES = 100


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def _applies(given: list[str]) -> str:
    return f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'}"


def _oracle_data(args) -> GaussianMixture:
    if args.data is None:
        raise UserError("--data is required with --denoiser oracle (or give --checkpoint DIR)")
    data = get_toy(args.data)
    if not isinstance(data, GaussianMixture):
        mixtures = sorted(k for k, f in TOY_DATASETS.items() if isinstance(f(), GaussianMixture))
        raise UserError(f"the oracle denoiser needs Gaussian-mixture data; {args.data!r} is not one "
                        f"(valid with --denoiser oracle: {', '.join(mixtures)})")
    if args.variance not in FIXED_VARIANCES:
        raise UserError(f"the oracle predicts only the mean; --variance must be one of "
                        f"{', '.join(FIXED_VARIANCES)}, got {args.variance!r}")
    return data


def _oracle_model(args, data: GaussianMixture, schedule: NoiseSchedule):
    rescaling = fit_rescaling(args.rescale, data, data.event_shape[0])
    model = ReverseProcess(MixtureDenoiser(rescaling.mixture(data), schedule), schedule,
                           prediction="x0", variance=args.variance,
                           decoder_variance=args.decoder_variance)
    config = {"data": args.data, "denoiser": "oracle",
              "schedule": "file:" + args.betas if args.betas else args.schedule,
              "timesteps": schedule.num_timesteps, "variance": args.variance,
              "decoder_variance": args.decoder_variance, "rescale": args.rescale}
    return model, rescaling, config


def cmd_evaluate(args) -> int:
    if args.checkpoint:
        return _evaluate_checkpoint(args)
    if given := _given(args, CHECKPOINT_OPTIONS):
        raise UserError(f"{_applies(given)} to a trained network (--checkpoint DIR), not to the "
                        "oracle")
    for name, value in ORACLE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    distributed.init("cpu")  # under torchrun each rank evaluates a slice of the test points
    if args.device != "cpu":
        raise UserError("--device applies to a trained network (--checkpoint); the oracle is "
                        "evaluated in float64 on the CPU")
    if args.precision != "fp32":
        raise UserError("--precision applies to a trained network (--checkpoint); the oracle is "
                        "evaluated in float64")
    torch.set_default_dtype(torch.float64)  # the oracle is analytic: evaluate it in float64
    data = _oracle_data(args)
    dim, K = data.event_shape[0], data.num_components
    betas = _load_betas(args.betas) if args.betas else None
    T = len(betas) if betas is not None else args.timesteps
    x = None
    if args.data_file:  # its first --samples rows, all by default
        x = check_data(_load_array(args.data_file), dim,
                       what=f"data in {args.data_file!r}")[: args.samples]
    n = len(x) if x is not None else args.samples or DEFAULT_EVAL_SAMPLES
    _check_bound_options(args, T)
    require_memory(bound_bytes(n, T, dim, chunk_size=args.chunk_size or 0,
                               net_bytes_per_pair=MixtureDenoiser.example_bytes(K, dim, 8)),
                   f"the bound over {n} test points x T = {T} steps",
                   hint="lower --samples or --timesteps")
    require_memory(args.entropy_samples * (3 + 3 * K) * dim * 8,
                   f"the data entropy from {args.entropy_samples} draws",
                   hint="lower --entropy-samples")
    schedule = (NoiseSchedule.from_betas(betas) if betas is not None
                else make_schedule(args.schedule, args.timesteps))
    model, rescaling, config = _oracle_model(args, data, schedule)
    if args.sampling_timesteps:
        model = model.respaced(spaced_steps(T, args.sampling_timesteps))
    config["sampling_timesteps"] = args.sampling_timesteps
    if x is None:
        _, x = toy_split(data, 0, n, args.seed)
    entropy = entropy_mc(data, args.entropy_samples,
                         generator=torch.Generator().manual_seed(args.seed + 1_000_003))
    # the paired gap estimate needs test points drawn from the data itself
    log_px = data.log_prob(x) if has_exact_density(data) and not args.data_file else None
    gen = torch.Generator().manual_seed(distributed.rank_seed(args.seed))  # each rank its own draws
    z = rescaling.apply(x)
    with torch.no_grad():
        report = bound_report(model, z, log_jacobian=rescaling.log_abs_det,
                              entropy=entropy, data_log_prob=log_px, chunk_size=args.chunk_size,
                              memory_budget=args.memory_budget,
                              timestep_samples=args.timestep_samples,
                              progress=not args.no_progress, generator=gen).to_dict()
        report |= other_likelihoods(
            model, z, args.likelihood, log_jacobian=rescaling.log_abs_det,
            continuous_samples=args.continuous_samples or DEFAULT_CONTINUOUS_SAMPLES,
            ode_options=_ode_options(args), memory_budget=args.memory_budget, generator=gen)
    _require_finite(report, lambda: _size_reason(z, network=False)
                    or "the oracle's arithmetic overflowed on these test points")
    config["seed"] = args.seed
    if distributed.is_main():
        print(_json(report | config) if args.json else _summary(report, config))
    return 0


def _evaluate_checkpoint(args) -> int:
    if given := _given(args, ORACLE_OPTIONS):
        raise UserError(f"{_applies(given)} to the oracle denoiser; a --checkpoint run is "
                        "evaluated with its own data, schedule and variance (drop the option)")
    # under torchrun each rank evaluates a slice of the test points (on cuda:LOCAL_RANK with cuda)
    run = _load_run_with_data_dir(args, distributed.init(check_device(args.device)))
    run.model = run.model.replace(net=wrap_precision(run.model.net, args.precision, run.device.type))
    cfg = run.config
    image = is_image_data(cfg.data)
    dim = run.rescaling.shift.numel()
    x = None
    if args.data_file and image:
        raise UserError("--data-file takes vectors; an image run is evaluated on its dataset's "
                        "test split (--data-dir to point at the files)")
    if args.data_file:  # its first --samples rows, all by default
        x = check_data(_load_array(args.data_file), dim,
                       what=f"data in {args.data_file!r}")[: args.samples]
    samples = args.samples or (DEFAULT_IMAGE_EVAL_SAMPLES if image else DEFAULT_EVAL_SAMPLES)
    n = len(x) if x is not None else samples if image else min(samples, test_points(cfg))
    # what stays in host memory: the N x T terms and the N examples (the chunks run on --device)
    require_memory(bound_bytes(n, cfg.timesteps, dim, chunk_size=0),
                   f"the bound over {n} test points x T = {cfg.timesteps} steps",
                   hint="lower --samples")
    # sampling an image costs T U-Net passes: no sample metric unless asked for
    default_metric = 0 if image else min(2000, test_points(cfg))
    metric = args.metric_samples if args.metric_samples is not None else default_metric
    if args.clip_denoised and not image:
        raise UserError(f"--clip-denoised clips x_0 to the image range [-1, 1]; {cfg.data} is "
                        "vector data")
    if args.fid_samples and not image:
        raise UserError(f"--fid-samples measures image samples; {cfg.data} is vector data (its "
                        "sample metrics are --metric-samples)")
    fid_steps = args.fid_sampling_timesteps
    if fid_steps is not None:
        if not args.fid_samples:
            raise UserError("--fid-sampling-timesteps applies to the samples of --fid-samples N")
        if not 1 <= fid_steps <= cfg.timesteps:
            raise UserError(f"--fid-sampling-timesteps must be in 1..{cfg.timesteps} (the run's "
                            f"T), got {fid_steps}")
    _check_bound_options(args, cfg.timesteps)
    report = evaluate_run(run, samples=samples, seed=args.seed, metric_samples=metric,
                          entropy_samples=args.entropy_samples, chunk_size=args.chunk_size,
                          memory_budget=args.memory_budget, timestep_samples=args.timestep_samples,
                          sampling_timesteps=args.sampling_timesteps,
                          clip_denoised=bool(args.clip_denoised),
                          progress=not args.no_progress, x=x, likelihoods=args.likelihood,
                          fid_samples=args.fid_samples or 0, fid_sampling_timesteps=fid_steps,
                          continuous_samples=args.continuous_samples or DEFAULT_CONTINUOUS_SAMPLES,
                          ode_options=_ode_options(args))
    report.pop("_samples", None)
    _require_finite(report, lambda: _checkpoint_reason(report, x, run))
    config = asdict(cfg) | {"denoiser": "checkpoint", "checkpoint": str(args.checkpoint),
                            "step": run.step, "eval_seed": args.seed, "eval_precision": args.precision,
                            "eval_processes": distributed.world_size(),
                            "threads": torch.get_num_threads()}
    if distributed.is_main():
        print(_json(report | config) if args.json else _summary(report, config))
    return 0


def _json(obj: dict) -> str:
    """Strict JSON (RFC 8259): NaN and infinities were refused before (``_require_finite``)."""
    return json.dumps(obj, allow_nan=False)


def _require_finite(report: dict, reason) -> None:
    """``RunFailed`` naming the non-finite entries of ``report`` and ``reason()``, if any."""
    bad = nonfinite_fields(report)
    if bad:
        raise RunFailed(f"the result is not finite: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                        f"NaN or infinite ({reason()}); nothing printed")


def _size_reason(z: torch.Tensor, *, network: bool) -> str | None:
    """The size of the (rescaled) test points ``z``, if it explains a bound that is not finite:
    the bound is computed in float64, a network in float32."""
    top = float(z.abs().max()) if z.numel() else 0.0
    if not top < math.sqrt(torch.finfo(torch.float64).max / 10):
        return f"the (rescaled) test points reach |x| = {top:.3g}, whose square overflows float64"
    if network and not top < 1e30:
        return (f"the (rescaled) test points reach |x| = {top:.3g}, near the end of the float32 "
                "range the network computes in")
    return None


def _checkpoint_reason(report: dict, x: torch.Tensor | None, run) -> str:
    """Why a run's report is not finite; its weights are (``load_run`` checks)."""
    bound = [b for b in nonfinite_fields(report) if not b.startswith(("energy_", "sliced_"))]
    if not bound:
        return "the model's samples are not finite: the sampling chain diverged"
    return ((x is not None and _size_reason(run.rescaling.apply(x), network=True))
            or "the network's outputs overflowed on these test points")


def _f(v: float) -> str:
    """Four decimals, or six significant digits for a number too large for them to mean much."""
    return f"{v:.4f}" if abs(v) < 1e9 else f"{v:.6g}"


def _stderr(se: float | None) -> str:
    return "n/a" if se is None else _f(se)


def _summary(r: dict, cfg: dict) -> str:
    what = ("oracle denoiser" if cfg["denoiser"] == "oracle"
            else f"run {cfg['checkpoint']} ({cfg['objective']}, step {cfg['step']})")
    schedule = f"--betas {cfg['betas']}" if cfg.get("betas") else f"{cfg['schedule']} schedule"
    lines = [f"{cfg['data']}: {what}, {schedule}, T = "
             f"{cfg['timesteps']}, variance {cfg['variance']}, decoder variance "
             f"{cfg['decoder_variance']}, rescale {cfg['rescale']}, {r['num_samples']} test points"
             + (f", {cfg['threads']} thread{'s' if cfg['threads'] != 1 else ''}"
                if "threads" in cfg else ""),
             f"  bound on -log p(x):  {_f(r['nll_nats'])} +- {_stderr(r['nll_stderr'])} nats "
             f"({_f(r['bits_per_dim'])} bits/dim, D = {r['dim']})",
             f"  prior term L_T:      {r['prior_nats']:.3g} nats"]
    if r["terms_nats"] is not None:
        lines += [f"  decoder term L_0:    {_f(r['terms_nats'][0])} nats",
                  f"  transition terms:    {_f(sum(r['terms_nats'][1:]))} nats (sum of "
                  "L_1..L_{T-1})"]
    else:
        lines.append(f"  estimator:           L_0 and {r['timestep_samples']} stratified steps "
                     f"of 2..{cfg['timesteps']} per test point (unbiased; no per-step terms)")
    if "continuous" in r:
        c = r["continuous"]
        lines.append(f"  continuous-time bound: {_f(c['nll_nats'])} +- {_stderr(c['nll_stderr'])} "
                     f"nats ({_f(c['bits_per_dim'])} bits/dim; {c['num_u']} log-SNR draws per "
                     "point, "
                     f"{c['wall_seconds']:.1f} s)")
    if "ode" in r:
        o = r["ode"]
        lines.append(f"  probability-flow ODE: {_f(o['nll_nats'])} +- {_stderr(o['nll_stderr'])} "
                     f"nats ({_f(o['bits_per_dim'])} bits/dim; {o['divergence']} divergence, "
                     f"rtol {o['rtol']:g}, atol {o['atol']:g}, {o['nfe']} evaluations, "
                     f"{o['wall_seconds']:.1f} s)")
    if r["log_jacobian_nats"]:
        lines.append(f"  rescaling log-Jacobian: {_f(r['log_jacobian_nats'])} nats (subtracted)")
    if r["entropy_nats"] is not None:
        lines.append(f"  data entropy:        {_f(r['entropy_nats'])} +- {_stderr(r['entropy_stderr'])} "
                     f"nats; gap {_f(r['gap_nats'])} +- {_stderr(r['gap_stderr'])}")
    if "fid" in r:
        lines.append(f"  sample quality:      FID {r['fid']:.2f}, precision {r['sample_precision']:.3f}, "
                     f"recall {r['sample_recall']:.3f} ({r['fid_samples']} samples of "
                     f"{r['fid_sampling_timesteps']} steps; FID of as many training images: "
                     f"{r['fid_floor']:.2f}; features: {r['fid_features']})")
    if "energy_distance" in r:
        lines.append(f"  samples vs held-out: energy distance {r['energy_distance']:.4f}, sliced "
                     f"W2 {r['sliced_wasserstein']:.4f} ({r['metric_samples']} points each)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="every term of the variational bound on test data")
    ev.add_argument("--checkpoint", metavar="DIR", help="evaluate a trained run (its test split)")
    # the oracle's options default to None (not given): --checkpoint refuses them, the oracle
    # fills in ORACLE_DEFAULTS
    od = {k: f"(oracle; default: {v})" for k, v in ORACLE_DEFAULTS.items()}
    ev.add_argument("--data", choices=sorted(TOY_DATASETS), metavar="NAME",
                    help=f"oracle: the dataset, one of: {', '.join(sorted(TOY_DATASETS))}")
    ev.add_argument("--data-file", help="evaluate on the first --samples points of this file "
                    "(.npy, .csv or text, N x D; all of them by default) instead of a test split "
                    "drawn from the dataset")
    ev.add_argument("--denoiser", choices=DENOISERS, default=None,
                    help="oracle: the Bayes-optimal E[x0|xt] of a Gaussian-mixture dataset "
                    + od["denoiser"])
    ev.add_argument("--schedule", choices=SCHEDULES, default=None, help=od["schedule"])
    ev.add_argument("--timesteps", type=_positive_int, default=None,
                    help="T, the number of steps " + od["timesteps"])
    ev.add_argument("--betas", metavar="FILE", help="oracle: beta_1..beta_T from a .npy or text "
                    "file, one row or one column (overrides --schedule and --timesteps)")
    ev.add_argument("--variance", default=None, metavar="NAME",
                    help=f"reverse variance, one of {', '.join(FIXED_VARIANCES)} " + od["variance"])
    ev.add_argument("--decoder-variance", choices=DECODER_VARIANCES, default=None,
                    help="sigma_1^2 at the decoder step under fixed variances "
                    + od["decoder_variance"])
    ev.add_argument("--rescale", choices=RESCALINGS, default=None,
                    help="diffuse rescaled data; the NLL is still reported in the data's units "
                    + od["rescale"])
    ev.add_argument("--samples", type=_positive_int, default=None,
                    help=f"test points (default: {DEFAULT_EVAL_SAMPLES}, images "
                    f"{DEFAULT_IMAGE_EVAL_SAMPLES}; with --data-file the file's first N rows, "
                    "default all)")
    ev.add_argument("--timestep-samples", type=_positive_int, default=None, metavar="K",
                    help="estimate each example's bound from L_0 and K stratified steps of 2..T "
                    "instead of all T terms (unbiased; its standard error includes the sampling "
                    "of t): about T/(K+1) times faster")
    ev.add_argument("--entropy-samples", type=_int_in(2), default=100_000,
                    help="Monte Carlo draws for the data entropy, >= 2 (default: 100000)")
    ev.add_argument("--chunk-size", type=_positive_int, default=None,
                    help="(example, step) pairs per network call (default: as many as "
                    "--memory-budget holds)")
    ev.add_argument("--memory-budget", type=_bytes, default=None, metavar="SIZE",
                    help="memory for the network's chunks, e.g. 512M or 2G (default: a quarter "
                    "of the available memory, at most 1G; on a GPU half its free memory)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--sampling-timesteps", type=_positive_int, default=None, metavar="K",
                    help="the bound of the respaced chain on K evenly spaced steps of the T "
                    "(T always kept; betas recomputed from alpha_bar), as pdiff sample uses it")
    ev.add_argument("--clip-denoised", action="store_const", const=True, default=None,
                    help="with --checkpoint of an image run: clip the predicted x_0 to [-1, 1] "
                    "inside the bound, as Improved DDPM's NLL script does by default")
    ev.add_argument("--likelihood", type=_list_of(LIKELIHOODS), default=("bound",),
                    metavar="NAME[,NAME]",
                    help="estimators of -log p(x), reported side by side on the same test points: "
                         "bound (the discrete T-step bound, always), continuous (the "
                         "continuous-time bound of VDM on the same schedule), ode (the exact "
                         "likelihood of the probability-flow ODE; images dequantized)")
    ev.add_argument("--continuous-samples", type=_positive_int, default=None, metavar="K",
                    help="--likelihood continuous: draws per test point, stratified in log-SNR "
                         f"(default "
                         f"{DEFAULT_CONTINUOUS_SAMPLES}, stratified)")
    ev.add_argument("--ode-rtol", dest="rtol", type=_positive_float, default=None,
                    help="--likelihood ode: the solver's relative tolerance (default 1e-5)")
    ev.add_argument("--ode-atol", dest="atol", type=_positive_float, default=None,
                    help="--likelihood ode: the solver's absolute tolerance (default 1e-5)")
    ev.add_argument("--ode-divergence", dest="divergence", default=None,
                    choices=("auto", "exact", "hutchinson"),
                    help="--likelihood ode: the divergence exactly (D passes) or by "
                         "Skilling-Hutchinson probes (default auto: exact for D <= 8)")
    ev.add_argument("--ode-probes", dest="probes", type=_positive_int, default=None,
                    help="--likelihood ode: Hutchinson probes per point (default 1)")
    ev.add_argument("--ode-u-start", dest="u_start", type=_positive_float, default=None,
                    metavar="U", help="--likelihood ode: where the flow starts, u in (0, 1) "
                                      "(default 1e-5, as Song et al. 2021)")
    ev.add_argument("--fid-samples", type=_nonnegative_int, default=None, metavar="N",
                    help="image runs: the Fréchet distance and precision/recall of N model samples "
                         "(with --sampling-timesteps K steps if given) against N test images, on "
                         "the features of a classifier pdiff trains once on the training split "
                         "and caches beside the data (default 0: none)")
    ev.add_argument("--fid-sampling-timesteps", type=_positive_int, default=None, metavar="K",
                    help="draw the --fid-samples on K evenly spaced steps of T, whatever chain "
                         "the bound is of (default: --sampling-timesteps, or T): the bound at T "
                         "beside samples of fewer steps in one call")
    ev.add_argument("--metric-samples", type=_nonnegative_int, default=None,
                    help="with --checkpoint: model samples for the energy distance and sliced W2 "
                    "to held-out test points (default: 2000 or the test split; images 0, as each "
                    "sample costs T network passes; 0: none)")
    ev.add_argument("--data-dir", metavar="DIR", help="with --checkpoint of an image run: where "
                    "the dataset's files are (default: the run's own --data-dir)")
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="with --checkpoint: bf16 runs the network under bfloat16 autocast")
    ev.add_argument("--device", default="cpu", metavar="cpu|cuda",
                    help="with --checkpoint: where the network evaluates the bound (under torchrun "
                    "cuda is each rank's own GPU)")
    ev.add_argument("--seed", type=_int_in(0, SEED_MAX), default=0, help=f"0..{SEED_MAX}")
    ev.add_argument("--json", action="store_true", help="print one JSON object (strict JSON: an "
                    "undefined value, such as the standard error of one test point, is null)")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train a denoiser on a toy dataset into a run directory")
    tr.add_argument("--out", required=True, metavar="DIR", help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(tr)
    tr.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="draw samples from a trained run into a file")
    sa.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory")
    sa.add_argument("--num", type=_positive_int, required=True, help="number of samples")
    sa.add_argument("--out", required=True, metavar="FILE",
                    help="output file: .npy, .csv or .txt (N x D, in the data's units); for "
                    "images a .png grid or .npy (N, C, H, W) in [-1, 1]")
    sa.add_argument("--sampling-timesteps", type=_positive_int, metavar="K",
                    help="sample on K evenly spaced steps of the run's T (T always kept)")
    # checked in cmd_sample, so that a bad value is one line (argparse adds its usage line)
    sa.add_argument("--sampler", default="ddpm", metavar="|".join(SAMPLING_METHODS),
                    help="ddpm: ancestral sampling from p_theta (default); ddim: DDIM (Song et al. "
                    "2021, eq. 12) with --eta, on the same (respaced) steps")
    sa.add_argument("--eta", default=None, metavar="ETA",
                    help="with --sampler ddim: sigma_t = eta sqrt(beta_tilde_t), a finite number "
                    ">= 0 (default 0: deterministic given x_T; 1: the fixed_small ancestral step's "
                    "variance)")
    sa.add_argument("--clip-denoised", action="store_true",
                    help="image runs: clip each predicted x_0 to [-1, 1] (Improved DDPM's sampler)")
    sa.add_argument("--sampling-variance", choices=FIXED_VARIANCES, default=None,
                    help="sample with sigma_t^2 = beta_tilde_t (fixed_small) or beta_t "
                         "(fixed_large) whatever the run learned (default: the run's own)")
    sa.add_argument("--sampling-schedule", choices=SCHEDULES, default=None, metavar="NAME",
                    help="sample on this schedule's chain of --sampling-timesteps (or T) steps, "
                         "each step fed to the network as its training step of nearest log-SNR "
                         f"({', '.join(SCHEDULES)})")
    sa.add_argument("--noiseless-last-step", action="store_true",
                    help="ancestral sampling: x_0 is the decoder's mean rather than a draw "
                         "(as Ho et al. display samples)")
    sa.add_argument("--figure", metavar="PNG", help="also draw the samples against held-out data")
    sa.add_argument("--data-dir", metavar="DIR", help="image runs: where the dataset's files are "
                    "(default: the run's own --data-dir)")
    sa.add_argument("--label", metavar="K|all",
                    help="class-conditional runs: sample class K, or 'all' to cycle through the "
                    "classes (default: unconditional, the null label)")
    sa.add_argument("--guidance", type=_finite_float, default=0.0, metavar="W",
                    help="classifier-free guidance scale w >= 0 with --label (default 0: the "
                    "conditional model as trained)")
    sa.add_argument("--device", default="cpu", metavar="cpu|cuda",
                    help="where the chain runs (a seed gives the same samples on the same kind "
                    "of device)")
    sa.add_argument("--seed", type=_int_in(0, SEED_MAX), default=0, help=f"0..{SEED_MAX}")
    sa.add_argument("--force", action="store_true", help="overwrite existing output files")
    sa.set_defaults(func=cmd_sample)

    sub.add_parser("bench", add_help=False,
                   help="measure speed against same-run baselines; writes docs/benchmarks.md "
                   "(pdiff bench --help)")

    co = sub.add_parser("compare", help="train and evaluate objectives x variances x seeds, "
                        "write results.json, results.md and figures")
    co.add_argument("--out", required=True, metavar="DIR", help="comparison directory")
    co.add_argument("--objectives", type=_list_of(OBJECTIVES), default=DEFAULT_OBJECTIVES,
                    help=f"comma-separated, from {', '.join(OBJECTIVES)} "
                    f"(default: {','.join(DEFAULT_OBJECTIVES)})")
    co.add_argument("--variances", type=_list_of(VARIANCES), default=DEFAULT_VARIANCES,
                    help=f"comma-separated, from {', '.join(VARIANCES)} "
                    f"(default: {','.join(DEFAULT_VARIANCES)})")
    co.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                    help="also vary another training option, e.g. --grid schedule=linear,cosine "
                    "(repeatable; not together with that option's own flag)")
    co.add_argument("--exclude", action="append", default=[], metavar="OPTION=V[,OPTION=V]",
                    help="leave out the grid's cells with these values, e.g. --exclude "
                    "objective=simple,variance=learned_range (repeatable)")
    co.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 (default: 3)")
    co.add_argument("--jobs", type=_positive_int, default=None,
                    help="runs trained at once in worker processes (default: the CPU count)")
    co.add_argument("--eval-samples", type=_positive_int, default=2000,
                    help="test points for each run's bound (default: 2000)")
    co.add_argument("--likelihood", type=_list_of(LIKELIHOODS), default=("bound",),
                    metavar="NAME[,NAME]",
                    help="estimators of -log p(x) in the table, side by side on the same test "
                         "points: bound (always), continuous, ode (see pdiff evaluate --help)")
    co.add_argument("--fid-samples", type=_nonnegative_int, default=0, metavar="N",
                    help="image data: the Fréchet distance and precision/recall of N samples of "
                         "each run against N test images (default 0: none)")
    co.add_argument("--metric-samples", type=_nonnegative_int, default=None,
                    help="model samples for the energy distance and sliced W2 to held-out "
                         "points (default: 1000; images 0, as each sample costs T network "
                         "passes: --fid-samples is the image metric)")
    co.add_argument("--no-figures", action="store_true", help="write no figures")
    co.add_argument("--resume", action="store_true",
                    help="reuse finished runs in --out and continue unfinished ones")
    co.add_argument("--force", action="store_true", help="overwrite an existing comparison in --out")
    _add_config_args(co, exclude=("objective", "variance", "seed"),
                     defaults={"iterations": COMPARE_ITERATIONS})
    co.set_defaults(func=cmd_compare)

    fi = sub.add_parser("figure", help="draw one of the closed-form figures of docs/ "
                        "(" + ", ".join(FIGURES) + ")")
    fi.add_argument("name", choices=sorted(FIGURES), metavar="NAME",
                    help="; ".join(f"{k}: {v[0]}" for k, v in FIGURES.items()))
    fi.add_argument("--out", required=True, metavar="PNG", help="the image to write")
    fi.add_argument("--force", action="store_true", help="overwrite an existing file")
    fi.set_defaults(func=cmd_figure)
    return parser


DEFAULT_OBJECTIVES = ("simple", "vlb", "hybrid")
DEFAULT_VARIANCES = ("fixed_small", "fixed_large", "learned_range")
COMPARE_ITERATIONS = 3000


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _data_name(text: str) -> str:
    """A dataset's name, or a file of points (.npy, .csv, .txt) that exists."""
    from .data.empirical import is_data_file

    if is_data_file(text):
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"no such file {text!r}")
        return text
    if text not in TrainConfig.CHOICES["data"]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a dataset ({', '.join(TrainConfig.CHOICES['data'])}) nor a "
            ".npy, .csv or .txt file of points")
    return text


def _list_of(valid):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in valid]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad)) or 'nothing'} not valid; choose from {', '.join(valid)}")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"{text!r} names an item twice")
        return items
    return parse


def _add_config_args(parser: argparse.ArgumentParser, exclude=(), defaults=None) -> None:
    """One option per ``TrainConfig`` field (``--batch-size`` for ``batch_size``)."""
    choices = TrainConfig.CHOICES
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        shown = f"(default: {default}" + (f"; images: {IMAGE_DEFAULTS[f.name]}"
                                          if f.name in IMAGE_DEFAULTS else "") + ")"
        # None: not given, so _config_from_args fills in the dataset's default
        kw = {"default": None, "help": shown}
        if isinstance(f.default, bool):  # a switch: --compile
            kw = {"default": None, "action": "store_true", "help": "(default: off)"}
        elif f.name == "data":  # a dataset's name or a file of points
            kw |= {"type": _data_name, "metavar": "NAME|FILE",
                   "help": f"{', '.join(choices['data'])}, or a .npy/.csv/.txt file of points, "
                           f"one a row (default: {default})"}
        elif f.name in choices:
            kw["choices"] = choices[f.name]
        elif "int" in str(f.type) or isinstance(f.default, int):
            kw["type"] = int
        elif "float" in str(f.type) or isinstance(f.default, float):
            kw["type"] = float
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def _config_from_args(args, exclude=(), toy_defaults=None) -> TrainConfig:
    """The options given on the command line over the defaults of the dataset's kind."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in exclude and getattr(args, f.name) is not None}
    data = given.pop("data", TrainConfig.data)
    defaults = {} if is_image_data(data) else (toy_defaults or {})
    if given.get("betas") and "timesteps" not in given:  # T is the file's length
        defaults = defaults | {"timesteps": len(_load_betas(given["betas"]))}
    return TrainConfig.for_data(data, **(defaults | given))


def cmd_train(args) -> int:
    """Train one run; under torchrun every rank runs this and rank 0 alone writes and prints."""
    cfg = _config_from_args(args)
    trainer = Trainer(cfg, args.out, resume=args.resume, force=args.force)
    try:
        last = trainer.train(progress=not args.no_progress)
    except TrainingError as e:
        _report(f"pdiff train: error: {e}", e)
        return 1
    if distributed.is_main():
        print(json.dumps({"out": str(args.out), "step": trainer.step} | last
                         | {"threads": torch.get_num_threads(), "threads_note": threads_note()}))
    return 0


SAMPLE_FORMATS = (".npy", ".csv", ".txt")
IMAGE_SAMPLE_FORMATS = (".png", ".npy")


def _sample_labels(run, args) -> torch.Tensor | None:
    """--label K | all as one label per sample (None: unconditional), checked against the run."""
    num_classes = getattr(run.model.net, "num_classes", None)
    if args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    if args.label is None:
        if args.guidance:
            raise UserError("--guidance needs --label (the class to guide towards)")
        return None
    if not num_classes:
        raise UserError(f"--label: the run in {args.checkpoint!r} is not class-conditional "
                        "(train with --class-cond)")
    if args.label == "all":
        return torch.arange(args.num) % num_classes
    try:
        k = int(args.label)
    except ValueError:
        k = -1
    if not 0 <= k < num_classes:
        raise UserError(f"--label {args.label!r}: expected a class in 0..{num_classes - 1} or 'all'")
    return torch.full((args.num,), k, dtype=torch.long)


def _write_image_samples(run, x: torch.Tensor, out: Path, figure: Path | None, args) -> int:
    """Images: a PNG grid (atomic) or the (N, C, H, W) array in [-1, 1] as .npy."""
    from .data import to_uint8_grid
    from .files import atomic_write_bytes

    levels = run.model.num_levels
    targets = [out] + ([figure] if figure is not None else [])
    for path in targets:
        with _writing(path, out if path is figure else None):
            if path.suffix == ".png":
                atomic_write_bytes(_png_bytes(to_uint8_grid(x.float(), levels)), path)
            else:
                _write_array_atomic(x.float().numpy(), path)
    print(json.dumps({"out": str(out), "num": args.num, "shape": list(x.shape[1:]),
                      "sampling_timesteps": args.sampling_timesteps or run.config.timesteps,
                      "sampler": args.sampler, "eta": args.eta,
                 "clip_denoised": args.clip_denoised, "sampling_variance": args.sampling_variance,
                 "sampling_schedule": args.sampling_schedule,
                 "noiseless_last_step": args.noiseless_last_step, "num_levels": levels} | ({"figure": str(figure)} if figure else {})))
    return 0


def _png_bytes(grid: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def _write_array_atomic(arr: np.ndarray, path: Path) -> None:
    """Write ``arr`` as .npy or text next to ``path``, then rename: never half a file."""
    from .files import atomic_write

    def write(tmp: str) -> None:
        if path.suffix == ".npy":
            np.save(tmp, arr)
        else:
            np.savetxt(tmp, arr, delimiter="," if path.suffix == ".csv" else " ", fmt="%.8g")
    atomic_write(path, write, suffix=path.suffix)  # np.save adds .npy to a name without it


class _writing:
    """An ``OSError`` while writing ``path`` (a full disk) as ``RunFailed`` naming it; the write is
    atomic, so the old file is intact. ``written``: a file written before, which is kept."""

    def __init__(self, path: Path, written: Path | None = None):
        self.path, self.written = path, written

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError):
            kept = (f"; the samples are in {str(self.written)!r}" if self.written is not None else
                    "; nothing written" + (" (the old file is intact)" if self.path.exists() else ""))
            raise RunFailed(f"could not write {str(self.path)!r}: {error.strerror or error}{kept}") \
                from None
        return False


def _check_new_file(path: Path, force: bool, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory; expected a file name")
    if path.exists() and not force:
        raise UserError(f"{what} {str(path)!r} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {what} {str(path)!r}: folder {str(path.parent)!r} does not exist")
    if not os_access_w(path.parent):
        raise UserError(f"cannot write {what} {str(path)!r}: folder {str(path.parent)!r} is not writable")


def os_access_w(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK)


def _load_run_with_data_dir(args, device: str | torch.device = "cpu"):
    run = load_run(args.checkpoint, device=device)
    if getattr(args, "data_dir", None):
        run.config = replace(run.config, data_dir=args.data_dir)
    return run


def _sampler_and_eta(args) -> None:
    """--sampler in SAMPLING_METHODS; --eta finite and >= 0, given only with ddim (default 0);
    ``args.eta`` becomes the float used (None under ddpm)."""
    if args.sampler not in SAMPLING_METHODS:
        raise UserError(f"--sampler {args.sampler!r}: unknown sampler; valid: "
                        f"{', '.join(SAMPLING_METHODS)}")
    if args.sampler != "ddim":
        if args.eta is not None:
            raise UserError("--eta applies to --sampler ddim only (ddpm draws each step with the "
                            "model's own variance)")
        return
    text = "0" if args.eta is None else args.eta
    try:
        eta = float(text)
    except ValueError:
        eta = math.nan
    if not math.isfinite(eta) or eta < 0:
        raise UserError(f"--eta {text!r}: expected a finite number >= 0")
    args.eta = eta


def cmd_sample(args) -> int:
    _sampler_and_eta(args)
    out = Path(args.out)
    figure = Path(args.figure) if args.figure else None
    if figure is not None and figure.suffix != ".png":
        raise UserError(f"--figure {args.figure!r}: expected a .png file")
    run = _load_run_with_data_dir(args, args.device)
    image = is_image_data(run.config.data)
    formats = IMAGE_SAMPLE_FORMATS if image else SAMPLE_FORMATS
    if out.suffix not in formats:
        raise UserError(f"--out {args.out!r}: unknown format {out.suffix or '(none)'!r} for "
                        f"{'image' if image else 'vector'} data; valid: {', '.join(formats)}")
    _check_new_file(out, args.force, "output file")
    if figure is not None:
        _check_new_file(figure, args.force, "figure")
    if args.clip_denoised and not image:
        raise UserError(f"--clip-denoised clips x_0 to the image range [-1, 1]; {run.config.data} "
                        "is vector data")
    if args.noiseless_last_step and args.sampler != "ddpm":
        raise UserError("--noiseless-last-step applies to --sampler ddpm (DDIM's last step draws "
                        "no noise)")
    labels = _sample_labels(run, args)
    numel = math.prod(run.event_shape)
    # the chunks drawn in float32, joined, in float64 and rescaled, and the copy that is written
    require_memory(args.num * numel * 32, f"{args.num} samples of {numel} values",
                   hint="lower --num (several files with different --seed add up to more)")
    x = draw_samples(run, args.num, seed=args.seed, sampling_timesteps=args.sampling_timesteps,
                     labels=labels, guidance=args.guidance, sampler=args.sampler, eta=args.eta,
                     clip_denoised=args.clip_denoised, sampling_variance=args.sampling_variance,
                     sampling_schedule=args.sampling_schedule,
                     noiseless_last_step=args.noiseless_last_step)
    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:  # the checkpoint's weights are finite (load_run checks): the chain overflowed
        raise RunFailed(f"{bad} of {args.num} samples are not finite (NaN or infinite): the "
                        "sampling chain diverged; nothing written")
    if image:
        return _write_image_samples(run, x, out, figure, args)
    with _writing(out):
        _write_array_atomic(x.numpy(), out)
    if figure is not None:
        from .figures import plot_samples_grid

        data = get_toy(run.config.data)
        _, test = toy_split(data, 0, min(test_points(run.config), 5000), run.config.seed)
        steps = args.sampling_timesteps or run.config.timesteps
        how = f", DDIM eta = {args.eta:g}" if args.sampler == "ddim" else ""
        with _writing(figure, out):
            plot_samples_grid({f"{run.config.objective} / {run.config.variance}, {steps} sampling "
                               f"steps{how}": x}, test, figure,
                              density=data.log_prob if has_exact_density(data) else None,
                              title=f"{run.config.data}: {args.num} samples against held-out data")
    # the standard deviation of one sample is undefined: null
    print(_json({"out": str(out), "num": args.num, "dim": x.shape[1],
                 "sampling_timesteps": args.sampling_timesteps or run.config.timesteps,
                 "sampler": args.sampler, "eta": args.eta,
                 "clip_denoised": args.clip_denoised, "sampling_variance": args.sampling_variance,
                 "sampling_schedule": args.sampling_schedule,
                 "noiseless_last_step": args.noiseless_last_step,
                 "mean": x.mean(0).tolist(), "std": x.std(0).tolist() if args.num > 1 else None}
                | ({"figure": str(figure)} if figure else {})))
    return 0


def _grid_value(kind: type, text: str):
    """``text`` as a value of ``kind``; booleans are true/false (bool("false") would be True)."""
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    return kind(text)


def _field_type(f) -> type:
    """The type of a ``TrainConfig`` field's values (from its annotation where its default is None)."""
    if f.default is not None:
        return type(f.default)
    return next((t for t in (bool, int, float) if t.__name__ in str(f.type)), str)


def _grid_axes(items: list[str]) -> dict[str, tuple]:
    """``["schedule=linear,cosine", "lr=1e-3,2e-3"]`` -> axes, each value of its field's type."""
    types = {f.name: _field_type(f) for f in fields(TrainConfig)}
    axes: dict[str, tuple] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--grid {item!r}: expected OPTION=V1,V2,... such as schedule=linear,cosine")
        if name in ("objective", "variance", "seed"):
            raise UserError(f"--grid {item!r}: use --objectives, --variances or --seeds for {name}")
        if name not in types:
            raise UserError(f"--grid {item!r}: unknown option {name!r}; valid: "
                            + ", ".join(sorted(set(types) - {'objective', 'variance', 'seed'})))
        if name in axes:
            raise UserError(f"--grid names {name!r} twice")
        try:
            axes[name] = tuple(_grid_value(types[name], v.strip()) for v in values.split(",") if v.strip())
        except ValueError:
            kind = "true/false" if types[name] is bool else types[name].__name__
            raise UserError(f"--grid {item!r}: {name} takes {kind} values") from None
    return axes


def _grid_exclusions(items: list[str], axes: dict[str, tuple]) -> tuple[dict, ...]:
    """``["objective=simple,variance=learned_range"]`` -> partial cells, values typed as the axes'."""
    out = []
    for item in items:
        cell = {}
        for pair in item.split(","):
            name, sep, value = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not value.strip() or name not in axes:
                raise UserError(f"--exclude {item!r}: expected OPTION=VALUE[,OPTION=VALUE...] over "
                                f"the grid's axes ({', '.join(axes)}), such as "
                                "objective=simple,variance=learned_range")
            kind = type(axes[name][0])
            try:
                cell[name] = _grid_value(kind, value.strip())
            except ValueError:
                raise UserError(f"--exclude {item!r}: {name} takes {kind.__name__} values") from None
        out.append(cell)
    return tuple(out)


def _figure_continuous_limit(path: Path) -> None:
    from .figures import plot_continuous_limit

    plot_continuous_limit(path)


def _figure_weightings(path: Path) -> None:
    from .weighting import plot_weightings

    plot_weightings(path)


# name -> (what it shows, how to draw it at a path)
FIGURES = {
    "weightings": ("the weighting w(lambda) over log-SNR that each objective puts on the ELBO's "
                   "integrand (Kingma & Gao 2023), linear and cosine schedules", _figure_weightings),
    "continuous-limit": ("the discrete T'-step bound converging to the continuous-time bound "
                         "(exact denoiser, Gaussian data, closed form)", _figure_continuous_limit),
}


def cmd_figure(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {args.out!r}")
    _check_new_file(out, args.force, "--out")
    with _writing(out):
        FIGURES[args.name][1](out)
    print(f"wrote {out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import GridSpec, WriteError, compare, results_table

    base = _config_from_args(args, exclude=("objective", "variance", "seed"),
                             toy_defaults={"iterations": COMPARE_ITERATIONS})
    grid = _grid_axes(args.grid)
    both = [name for name in grid if getattr(args, name, None) is not None]
    if both:
        raise UserError(f"{', '.join('--' + n.replace('_', '-') for n in both)} given both as an "
                        "option and in --grid; give each option one way")
    axes = {"objective": args.objectives, "variance": args.variances} | grid
    image = is_image_data(base.data)
    # an image sample costs T U-Net passes, and the energy distance between images says little:
    # none by default, as in pdiff evaluate (--fid-samples is the image metric)
    metric = args.metric_samples if args.metric_samples is not None else (0 if image else 1000)
    spec = GridSpec(base, axes, tuple(range(args.seeds)), eval_samples=args.eval_samples,
                    metric_samples=metric, exclude=_grid_exclusions(args.exclude, axes),
                    likelihoods=args.likelihood, fid_samples=args.fid_samples)
    try:
        result = compare(spec, args.out, jobs=args.jobs, resume=args.resume, force=args.force,
                         figures=not args.no_figures, command=args.command_line, log=sys.stderr)
    except WriteError as e:  # a full disk: the runs may be fine, the comparison is not written
        raise RunFailed(f"{e}; the comparison failed: free some space and rerun with --resume "
                        f"(its finished runs are kept in {str(args.out)!r})") from None
    print(results_table(result.rows, image=image))
    out = Path(args.out)
    print(f"\nresults: {out / 'results.md'}, {out / 'results.json'}"
          + (f"; figures: {out / 'figures'}" if result.figures else ""))
    return 0 if any(r["ok"] for r in result.rows) else 1


def _report(message: str, error: Exception) -> None:
    """Print an error; under torchrun one raised on every rank at once is printed by rank 0 alone,
    and no rank exits before it has (torchrun stops the others when one exits with an error)."""
    everywhere = getattr(error, "on_every_rank", False)
    if distributed.is_main() or not everywhere:
        print(message, file=sys.stderr)
    if everywhere:
        distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # freed activations stay in the process (see pdiff.runtime)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own options: pdiff bench --help
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="pdiff bench")
    args = parser.parse_args(argv)
    args.command_line = "pdiff " + " ".join(shlex.quote(a) for a in argv)
    # torch's threads from the cores this process may use (its affinity and cgroup quota, or
    # OMP_NUM_THREADS); the outputs say how many (runtime.threads_note)
    set_threads()
    warnings.formatwarning = lambda message, category, *_: f"pdiff {args.command}: warning: {message}\n"
    try:
        if distributed.launched() and args.command not in ("train", "evaluate"):
            raise UserError(f"pdiff {args.command} runs in one process; under torchrun only train "
                            "and evaluate split their work over processes")
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe is found here, inside the handler below
        return code
    except (UserError, ValueError) as e:
        _report(f"pdiff {args.command}: error: {e}", e)
        return 2
    except RunFailed as e:
        _report(f"pdiff {args.command}: error: {e}", e)
        return 1
    except KeyboardInterrupt as e:
        where = getattr(e, "resume_hint", "")
        print(f"pdiff {args.command}: interrupted" + (f"; {where}" if where else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # pdiff evaluate --json | head -c1: the reader is gone, nothing to say
        _silence_stdout()
        return 1
    finally:
        distributed.cleanup()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
