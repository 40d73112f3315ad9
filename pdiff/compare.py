"""Trained runs evaluated, and grids of runs compared: what ``pdiff evaluate --checkpoint`` and
``pdiff compare`` compute.

``evaluate_run`` gives a run's bound on its fixed test split (every term, the paired gap to the
data entropy where the density is known) and, optionally, a sample-based distance between model
samples and held-out data. ``run_grid`` trains and evaluates objectives x variances x seeds into
``OUT/runs/<objective>-<variance>-s<seed>`` (in parallel worker processes), ``summarize`` reduces
the runs to one row per (objective, variance) with standard errors across seeds, and
``write_results`` writes ``results.json`` and ``results.md`` atomically.

The worker processes go with the command: Ctrl-C stops them and prints one line (exit 130), and
a command killed outright takes them with it (``pdiff.workers``). A file that cannot be
written (a full disk) is a ``WriteError`` naming it; the old file stays whole.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import shutil
import time
import traceback
from concurrent.futures import as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import distributed
from .data import entropy_mc, get_toy, has_exact_density, toy_split
from .evaluation import (LIKELIHOODS, CastNet, bound_report, default_memory_budget, nonfinite_fields,
                         other_likelihoods, pair_bytes)
from .metrics import energy_distance, sliced_wasserstein
from .run_data import is_image_data, load_run_data, test_points
from .runtime import allocator_tuned
from .sampling import ancestral_sample, check_sampler, ddim_sample
from .schedules import spaced_steps
from .files import atomic_save, atomic_write, atomic_write_text
from .workers import in_worker, sigint_held, stop_pool, worker_pool
from .train import CHECKPOINT, Run, TrainConfig, Trainer, check_memory, load_run

EVAL_FILE = "eval.json"
# objectives whose loss is a bound in nats (it can be negative: no log axis)
BOUND_OBJECTIVES = ("vlb", "trajectory", "elbo", "continuous")
SAMPLES_FILE = "samples.pt"


class WriteError(OSError):
    """A file of the comparison that could not be written (a full disk), named in one line."""


@contextmanager
def _writing(path: Path):
    """An ``OSError`` inside becomes a ``WriteError`` naming ``path``: the error itself names the
    temporary file that ``atomic_write`` has already removed."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"could not write {str(path)!r}: {e.strerror or e}") from e


# -- one run ---------------------------------------------------------------------------------------

def draw_samples(run: Run, num: int, *, seed: int = 0, sampling_timesteps: int | None = None,
                 chunk: int | None = None, labels: torch.Tensor | None = None,
                 guidance: float = 0.0, sampler: str = "ddpm",
                 eta: float | None = None, clip_denoised: bool = False,
                 sampling_variance: str | None = None, sampling_schedule: str | None = None,
                 noiseless_last_step: bool = False) -> torch.Tensor:
    """``num`` samples of a run's model, in the data's own units (rescaling undone), float64 on the
    CPU: ancestral (``sampler="ddpm"``) or DDIM with ``eta`` (``"ddim"``, eta 0 unless given;
    ``sampling.ddim_sample``). ``sampling_timesteps`` respaces the chain (evenly spaced steps, T
    kept) for either. The chain runs where the run's network is (``load_run(device=...)``), its
    noise drawn from a generator there seeded ``seed``: a seed gives the same samples on the same
    kind of device.

    A class-conditional run samples p(x) (the null label) unless ``labels`` (``num`` of them, or
    one for all) are given; ``guidance`` w >= 0 is the classifier-free guidance scale
    (``nets.GuidedNet``; 0: the conditional model as trained).

    ``clip_denoised``: x_0 predictions clipped to [-1, 1] (images); ``sampling_variance``:
    sigma_t^2 fixed to ``fixed_small`` or ``fixed_large`` whatever the run learned
    (``ReverseProcess.with_variance``); ``sampling_schedule``: the chain of that named schedule with
    ``sampling_timesteps`` (or T) steps, each fed to the network as its training step of nearest
    log-SNR (``ReverseProcess.with_schedule``), in place of the respaced one;
    ``noiseless_last_step``: x_0 is the decoder's mean, not a draw (ancestral sampling).

    The chains run ``chunk`` at a time, by default as many as the default memory budget holds
    (``evaluation.default_memory_budget`` over the network's activations per sample, measured by
    a dry run): the samples depend on the chunk, not on anything else."""
    from .nets import GuidedNet

    eta = check_sampler(sampler, eta)
    model = run.model
    num_classes = getattr(run.model.net, "num_classes", None)
    if labels is None and guidance:
        raise ValueError("classifier-free guidance needs labels to guide towards")
    if labels is not None:
        if not num_classes:
            raise ValueError("labels were given but the run is not class-conditional (train it "
                             "with --class-cond)")
        labels = torch.as_tensor(labels, dtype=torch.long).expand(num)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in 0..{num_classes - 1}, got "
                             f"{int(labels.min())}..{int(labels.max())}")
    if sampling_timesteps is not None and not 1 <= sampling_timesteps <= model.num_timesteps:
        raise ValueError(f"sampling timesteps must be in 1..{model.num_timesteps} (the run's "
                         f"T), got {sampling_timesteps}")
    if noiseless_last_step and sampler != "ddpm":
        raise ValueError("noiseless_last_step applies to ancestral sampling (DDIM's last step "
                         "has no noise)")
    if clip_denoised:
        if run.model.decoder_type != "discretized":
            raise ValueError("clip_denoised clips x_0 to the image range [-1, 1]; this run's data "
                             "are vectors")
        model = model.replace(clip_x0=1.0)
    if sampling_variance is not None:
        model = model.with_variance(sampling_variance)
    if sampling_schedule is not None:
        from .schedules import make_schedule

        model = model.with_schedule(make_schedule(sampling_schedule,
                                                  sampling_timesteps or model.num_timesteps))
    elif sampling_timesteps is not None and sampling_timesteps != model.num_timesteps:
        model = model.respaced(spaced_steps(model.num_timesteps, sampling_timesteps))
    device = run.device
    if chunk is None:
        like = torch.zeros((1,) + tuple(run.event_shape), device=device, dtype=torch.float32)
        chunk = max(1, default_memory_budget(device) // pair_bytes(model, like))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 sample, got {chunk}")
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        part = model
        if labels is not None:
            net = GuidedNet(model.net, labels[start:start + n], guidance, num_classes)
            part = model.replace(net=net)
        kwargs = dict(generator=gen, device=device, dtype=torch.float32)
        if sampler == "ddim":
            x = ddim_sample(part, (n,) + tuple(run.event_shape), eta=eta, **kwargs).x0
        else:
            x = ancestral_sample(part, (n,) + tuple(run.event_shape),
                                 noiseless_last_step=noiseless_last_step, **kwargs).x0
        parts.append(x.cpu())
    x = torch.cat(parts).double()
    return run.rescaling.invert(x)


def evaluate_run(run: Run, *, samples: int = 4000, seed: int = 0, metric_samples: int = 0,
                 entropy_samples: int = 100_000, chunk_size: int | None = None,
                 memory_budget: int | None = None, timestep_samples: int | None = None,
                 sampling_timesteps: int | None = None, clip_denoised: bool = False,
                 progress: bool = False, x: torch.Tensor | None = None,
                 likelihoods: tuple[str, ...] = (), continuous_samples: int = 16,
                 ode_options: dict | None = None, fid_samples: int = 0,
                 fid_sampling_timesteps: int | None = None) -> dict:
    """The run's bound on the first ``samples`` points of its test split (or on ``x``, in data
    units), as ``BoundReport.to_dict()``; with ``metric_samples`` > 0 also the energy distance and
    sliced Wasserstein-2 distance between that many model samples and as many test points.
    ``chunk_size``, ``memory_budget``, ``timestep_samples`` and ``progress`` are
    ``bound_report``'s. ``sampling_timesteps`` K: the bound of the respaced K-step chain (the one
    ``draw_samples`` samples); ``clip_denoised``: x_0 predictions clipped to [-1, 1] (images), as
    Improved DDPM's NLL script does. Both are recorded in the report. ``likelihoods``: the other
    estimators to report beside the bound, on the same points (``evaluation.other_likelihoods``:
    ``continuous``, the continuous-time bound from ``continuous_samples`` log-SNR draws per point;
    ``ode``, the probability-flow ODE with ``ode_options``), each under its name. ``fid_samples``
    > 0 (images): the Fréchet distance, precision and recall of that many samples against the test
    images (``image_sample_quality``), drawn on ``fid_sampling_timesteps`` steps (default: those of
    the bound's chain).

    The gap to the entropy is the paired estimate over the test points (``BoundReport``). Under
    ``torchrun`` every rank calls it: the bound is sharded over the ranks (``bound_report``) and the
    sample metrics are drawn by rank 0 alone (the other ranks' reports lack them). The bound is
    evaluated where the run's network is (``load_run(device=...)``).
    """
    check_data_file(run)
    data = load_run_data(run.config, train=False)
    density = data.density
    paired = x is None
    if x is None:
        if data.is_image:  # the dataset's own test split: evaluate at most ``samples`` of it
            samples = min(samples, len(data.test))
        if samples > len(data.test):
            raise ValueError(f"samples ({samples}) exceeds the run's test split ({len(data.test)} points)")
        x = data.test[:samples]
    entropy = ((None, None) if density is None else
               entropy_mc(density, entropy_samples, generator=torch.Generator().manual_seed(seed + 1_000_003)))
    log_px = (density.log_prob(x.to(torch.get_default_dtype()))
              if paired and density is not None and has_exact_density(density) else None)
    device = run.device
    gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))  # each rank its own draws
    # toys: the bound's arithmetic in float64 around the float32 network (CastNet), so test points
    # whose squares overflow float32 keep a finite bound; images lie in [-1, 1]
    model = run.model
    if clip_denoised:
        if not data.is_image:
            raise ValueError(f"clip_denoised clips x_0 to the image range [-1, 1]; "
                             f"{run.config.data} is vector data")
        model = model.replace(clip_x0=1.0)
    if sampling_timesteps:
        model = model.respaced(spaced_steps(model.num_timesteps, sampling_timesteps))
    model, dtype = ((model, torch.float32) if data.is_image else
                    (model.replace(net=CastNet(model.net)), torch.float64))
    z = run.rescaling.apply(x).to(device, dtype)  # the test points in the model's units
    with torch.no_grad():
        report = bound_report(model, z,
                              log_jacobian=run.rescaling.log_abs_det, entropy=entropy,
                              data_log_prob=log_px, chunk_size=chunk_size,
                              memory_budget=memory_budget, timestep_samples=timestep_samples,
                              progress=progress, generator=gen).to_dict()
        report |= other_likelihoods(model, z, likelihoods,
                                    log_jacobian=run.rescaling.log_abs_det,
                                    continuous_samples=continuous_samples, ode_options=ode_options,
                                    memory_budget=memory_budget, log_snr=run.log_snr,
                                    generator=gen)
    report |= {"sampling_timesteps": sampling_timesteps, "clip_denoised": clip_denoised}
    if metric_samples > 0 and distributed.is_main():
        report |= sample_metrics(run, metric_samples, seed=seed)
    if fid_samples > 0 and distributed.is_main():
        report |= image_sample_quality(run, fid_samples, seed=seed,
                                       sampling_timesteps=fid_sampling_timesteps or sampling_timesteps)
    return report


def image_sample_quality(run: Run, num: int, *, seed: int = 0,
                         sampling_timesteps: int | None = None) -> dict:
    """The Fréchet distance and the precision and recall (k = 3) between ``num`` model samples
    (drawn with ``sampling_timesteps`` steps, T by default) and the first ``num`` test images, on
    the features of the classifier pdiff trains once on the dataset's training split and caches
    beside its files (``feature_net.feature_net_for``); ``fid_features`` names that classifier
    (its recipe and test accuracy), so the number is recorded with the features it was measured
    on. ``fid_floor`` is the FID of ``num`` training images against the same test images: what a
    model whose samples were the data would score at this sample size."""
    from .data import load_images
    from .feature_net import feature_net_for
    from .sample_quality import sample_quality

    cfg = run.config
    if not is_image_data(cfg.data):
        raise ValueError(f"the Fréchet distance compares images; {cfg.data} is vector data")
    data = load_images(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
    num = min(num, len(data.test))
    net = feature_net_for(cfg.data, cfg.data_dir, data=data)
    fake = draw_samples(run, num, seed=seed + 29, sampling_timesteps=sampling_timesteps)
    real = data.test[:num].double()
    q = sample_quality(fake, real, net)
    # the same number of training images in place of the samples: the FID a perfect model would
    # get at this N (the Fréchet distance of finite samples is biased upwards, more so for small N)
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:num]
    floor = sample_quality(data.train[pick].double(), real, net)
    return {"fid": q["fid"], "sample_precision": q["precision"], "sample_recall": q["recall"],
            "fid_samples": num, "fid_features": q["features"], "fid_floor": floor["fid"],
            "fid_sampling_timesteps": sampling_timesteps or cfg.timesteps}


def check_data_file(run: Run) -> None:
    """``ValueError`` if the run trained on a file of points that has changed since (its test
    split would not be the one the run holds out)."""
    if run.data_sha256 is not None and get_toy(run.config.data).sha256 != run.data_sha256:
        raise ValueError(f"the data file {run.config.data!r} has changed since the run was trained "
                         "(its SHA-256 differs): its test split is no longer the run's")


def sample_metrics(run: Run, num: int, *, seed: int = 0) -> dict:
    """Energy distance (unbiased, so about 0 for a perfect model) and sliced Wasserstein-2 between
    ``num`` model samples and the last ``num`` points of the run's test split (data units)."""
    data = load_run_data(run.config, train=False)
    test = data.test
    num = min(num, len(test)) if data.is_image else num
    if num > len(test):
        raise ValueError(f"metric samples ({num}) exceeds the run's test split ({len(test)} points)")
    held_out = test[-num:].double().flatten(1)
    x = draw_samples(run, num, seed=seed + 17)
    flat = x.flatten(1)
    return {"energy_distance": energy_distance(flat, held_out),
            "sliced_wasserstein": sliced_wasserstein(flat, held_out,
                                                     generator=torch.Generator().manual_seed(seed)),
            "metric_samples": num, "_samples": x}


# -- a grid of runs --------------------------------------------------------------------------------

@dataclass
class GridSpec:
    """What ``pdiff compare`` runs: ``base`` with every combination of the ``axes`` values (each
    axis a ``TrainConfig`` field, such as ``objective`` or ``schedule``), for each seed.

    A cell is one combination (a dict field -> value); its runs differ only in the seed.
    ``exclude`` leaves out every cell that agrees with one of its partial cells on all the fields
    that one names: ``({"objective": "simple", "variance": "learned_range"},)`` drops L_simple
    with a variance it does not train, whatever the other axes.
    """

    base: TrainConfig
    axes: dict[str, tuple]
    seeds: tuple[int, ...]
    eval_samples: int = 2000
    metric_samples: int = 1000
    exclude: tuple[dict, ...] = ()
    likelihoods: tuple[str, ...] = ()  # estimators beside the bound: continuous, ode
    fid_samples: int = 0  # images: samples for the Fréchet distance and precision / recall

    def __post_init__(self):
        # data_dir: one dataset, and a path in a value would nest its runs' directory names
        known = {f.name for f in fields(TrainConfig)} - {"seed", "data", "data_dir"}
        bad = [a for a in self.axes if a not in known]
        if bad:
            raise ValueError(f"cannot vary {', '.join(map(repr, bad))}: an axis must be a training "
                             f"option other than seed, data and data_dir (one dataset per "
                             f"comparison): {', '.join(sorted(known))}")
        if not self.axes or any(len(v) == 0 for v in self.axes.values()):
            raise ValueError("a grid needs at least one axis, each with at least one value")
        if not self.seeds:
            raise ValueError("a grid needs at least one seed")
        self.axes = {k: tuple(v) for k, v in self.axes.items()}
        self.likelihoods = tuple(x for x in self.likelihoods if x != "bound")
        wrong = [x for x in self.likelihoods if x not in LIKELIHOODS]
        if wrong:
            raise ValueError(f"unknown likelihood {wrong[0]!r}; valid: {', '.join(LIKELIHOODS)}")
        self.exclude = tuple(dict(e) for e in self.exclude)
        for e in self.exclude:
            wrong = [f"{k}={v!r}" for k, v in e.items() if k not in self.axes or v not in self.axes[k]]
            if not e or wrong:
                raise ValueError(f"an excluded cell must name values of the grid's axes "
                                 f"({', '.join(f'{k}: {list(v)}' for k, v in self.axes.items())}); "
                                 f"got {', '.join(wrong) or 'nothing'}")
        if not self.cells():
            raise ValueError("the excluded cells leave no cell of the grid to run")
        # a repeated value would give two runs one name and one directory
        twice = [f"{k} {list(v)}" for k, v in self.axes.items() if len(set(v)) != len(v)]
        if twice or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("a grid names a value twice: "
                             + "; ".join(twice or [f"seeds {list(self.seeds)}"]))

    def cells(self) -> list[dict]:
        """Every combination of the axes' values, less the excluded ones."""
        cells = [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]
        return [c for c in cells if not any(all(c[k] == v for k, v in e.items())
                                            for e in self.exclude)]

    @staticmethod
    def label(cell: dict) -> str:
        return " / ".join(str(v) for v in cell.values())

    @staticmethod
    def run_name(cell: dict, seed: int) -> str:
        return "-".join(str(v) for v in cell.values()) + f"-s{seed}"

    def configs(self) -> list[tuple[str, dict, TrainConfig]]:
        """(run name, cell, validated configuration) of every run; ``ValueError`` for any invalid one."""
        out = []
        for cell in self.cells():
            for seed in self.seeds:
                cfg = replace(self.base, seed=seed, **cell)
                try:
                    cfg.validate()
                    check_memory(cfg)  # a size that cannot fit is refused before any run starts
                    # checked per run: test_size may itself be an axis (images: their own split,
                    # evaluated on at most eval_samples test images)
                    if (not is_image_data(cfg.data)
                            and max(self.eval_samples, self.metric_samples) > test_points(cfg)):
                        raise ValueError(f"eval and metric samples ({self.eval_samples}, "
                                         f"{self.metric_samples}) must not exceed the test split "
                                         f"({test_points(cfg)} points)")
                except ValueError as e:
                    what = ", ".join(f"{k} {v!r}" for k, v in cell.items())
                    raise ValueError(f"{what}: {e}") from None
                out.append((self.run_name(cell, seed), cell, cfg))
        return out


def _finished(run_dir: Path, cfg: TrainConfig, eval_samples: int, metric_samples: int,
              likelihoods: tuple[str, ...] = (), fid_samples: int = 0) -> dict | None:
    """The saved evaluation of a run already trained to the end with this configuration and
    evaluated on as many points."""
    ev, conf = run_dir / EVAL_FILE, run_dir / "config.json"
    if not (ev.is_file() and conf.is_file() and (run_dir / CHECKPOINT).is_file()):
        return None
    try:
        saved = json.loads(ev.read_text())
        # fields the saved run predates read as their defaults (TrainConfig.from_dict)
        same = TrainConfig.from_dict(json.loads(conf.read_text())) == cfg
    except (OSError, ValueError):
        return None
    same_eval = (saved.get("eval_samples") == eval_samples
                 and saved.get("metric_samples") == metric_samples
                 and all(name in saved.get("eval", {}) for name in likelihoods)
                 and saved.get("eval", {}).get("fid_samples", 0) >= fid_samples)
    return saved if same and same_eval and saved.get("status") == "ok" else None


def run_one(name: str, cell: dict, cfg: TrainConfig, run_dir: str | Path, *, eval_samples: int,
            metric_samples: int, resume: bool, force: bool, threads: int | None = None,
            dtype: torch.dtype | None = None, likelihoods: tuple[str, ...] = (),
            fid_samples: int = 0, progress: bool = False) -> dict:
    """Train (or resume) and evaluate one run; a failure is returned as a record, not raised."""
    run_dir = Path(run_dir)
    if threads:
        torch.set_num_threads(threads)
    if dtype is not None:  # a worker process starts in float32 whatever its parent uses
        torch.set_default_dtype(dtype)
    record = {"name": name, "cell": cell, "seed": cfg.seed, "run_dir": str(run_dir),
              "eval_samples": eval_samples, "metric_samples": metric_samples}
    if resume and (done := _finished(run_dir, cfg, eval_samples, metric_samples,
                                     likelihoods, fid_samples)) is not None:
        return done | record | {"reused": True}
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        # resume: continue from the checkpoint; a run stopped before its first one starts over
        trainer = Trainer(cfg, run_dir, resume=resume, force=force or resume)
        start_step = trainer.step
        last = trainer.train(progress=progress)
        record |= {"train_seconds": time.perf_counter() - wall,
                   "train_cpu_seconds": time.process_time() - cpu,
                   "trained_steps": trainer.step - start_step, "it_per_s": last.get("it_per_s"),
                   "final_loss": last.get("loss")}
        del trainer
        run = load_run(run_dir)
        ev = evaluate_run(run, samples=eval_samples, seed=cfg.seed, metric_samples=metric_samples,
                          likelihoods=likelihoods, fid_samples=fid_samples)
        samples = ev.pop("_samples", None)
        bad = nonfinite_fields(ev)
        if bad:  # a failed run, like a non-finite loss: no NaN passes into the table as a number
            raise ArithmeticError(f"the evaluation is not finite: {', '.join(bad)} "
                                  f"{'is' if len(bad) == 1 else 'are'} NaN or infinite")
        if samples is not None:
            with _writing(run_dir / SAMPLES_FILE):
                atomic_save(samples, run_dir / SAMPLES_FILE)
        record |= {"status": "ok", "eval": ev}
    except Exception as e:  # reported as a failed run in the table, not dropped
        record |= {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=3)}
    try:
        with _writing(run_dir / EVAL_FILE):
            atomic_write_text(json.dumps(_strict(record)), run_dir / EVAL_FILE)
    except WriteError as e:  # a failed run, so that --resume evaluates it again
        record |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return record


def run_grid(spec: GridSpec, out: str | Path, *, jobs: int = 1, resume: bool = False,
             force: bool = False, on_result: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Every run of ``spec`` into ``out/runs``, ``jobs`` at a time (worker processes when > 1, each
    with its share of the CPU threads). Returns the records in grid order."""
    runs = spec.configs()
    root = Path(out) / "runs"
    with _writing(root):
        root.mkdir(parents=True, exist_ok=True)
    kw = dict(eval_samples=spec.eval_samples, metric_samples=spec.metric_samples, resume=resume,
              force=force, likelihoods=spec.likelihoods, fid_samples=spec.fid_samples)
    records: dict[str, dict] = {}
    if jobs <= 1:
        for name, cell, cfg in runs:
            records[name] = run_one(name, cell, cfg, root / name, **kw)
            if on_result:
                on_result(records[name], len(records), len(runs))
    else:
        threads = max(1, torch.get_num_threads() // jobs)  # the cores this process may use
        with worker_pool(jobs, tune=allocator_tuned()) as pool:
            try:
                with sigint_held():  # the workers are spawned by submit
                    futures = {pool.submit(in_worker, run_one, name, cell, cfg, root / name,
                                           threads=threads, dtype=torch.get_default_dtype(),
                                           **kw): name
                               for name, cell, cfg in runs}
                for fut in as_completed(futures):
                    name = futures[fut]
                    try:
                        records[name] = fut.result()
                    except Exception as e:  # the worker itself died
                        _, cell, cfg = next(r for r in runs if r[0] == name)
                        records[name] = {"name": name, "cell": cell, "seed": cfg.seed,
                                         "run_dir": str(root / name), "status": "failed",
                                         "error": f"worker process failed: {type(e).__name__}: {e}"}
                    if on_result:
                        on_result(records[name], len(records), len(runs))
            except BaseException:  # Ctrl-C, or an error in on_result
                stop_pool(pool)
                raise
    return [records[name] for name, _, _ in runs]


@dataclass
class Comparison:
    """What ``compare`` returns: the spec, the per-run records, the per-cell rows, the figures."""

    spec: GridSpec
    records: list[dict]
    rows: list[dict]
    figures: list[Path]


def prepare_out(out: str | Path, *, resume: bool = False, force: bool = False) -> Path:
    """The comparison directory, created and checked writable. A non-empty one is refused
    (``ValueError``) unless ``resume`` (reuse its finished runs) or ``force`` (overwrite: its
    results and figures are removed, its runs retrained)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise ValueError(f"comparison directory {str(out)!r} exists and is not empty; pass --resume "
                         "to reuse its finished runs or --force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to comparison directory {str(out)!r}: {e.strerror}") from None
    if force and not resume:
        for name in ("results.json", "results.md"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
    return out


def compare(spec: GridSpec, out: str | Path, *, jobs: int | None = None, resume: bool = False,
            force: bool = False, figures: bool = True, command: str = "", log=None) -> Comparison:
    """Train and evaluate every run of ``spec`` into ``out`` and write ``results.json``,
    ``results.md`` and (unless ``figures`` is false) ``figures/``: what ``pdiff compare`` does.
    ``jobs`` runs at a time (default: one per CPU); progress lines go to the stream ``log``."""
    runs = spec.configs()  # every configuration checked before anything is written
    out = prepare_out(out, resume=resume, force=force)
    jobs = jobs or min(os.cpu_count() or 1, len(runs))
    say = (lambda msg: print(msg, file=log, flush=True)) if log is not None else (lambda msg: None)
    shape = " x ".join(f"{len(v)} {k}" for k, v in spec.axes.items())
    if spec.exclude:
        shape = f"{len(spec.cells())} cells of {shape}"
    say(f"pdiff compare: {len(runs)} runs ({shape} x {len(spec.seeds)} seeds) on {spec.base.data}, "
        f"{spec.base.iterations} iterations each, {jobs} at a time")
    start = time.perf_counter()

    def report(r: dict, done: int, total: int) -> None:
        if r.get("status") == "ok":
            e = r["eval"]
            gap = f", gap {e['gap_nats']:.3f}" if e.get("gap_nats") is not None else ""
            took = "reused" if r.get("reused") else f"{r.get('train_seconds', 0):.0f} s"
            msg = f"NLL bound {e['nll_nats']:.3f}{gap} ({took})"
        else:
            msg = f"FAILED: {r.get('error')}"
        say(f"  [{done}/{total}] {r['name']}: {msg}")

    try:
        records = run_grid(spec, out, jobs=jobs, resume=resume, force=force, on_result=report)
        rows = summarize(records)
        with _writing(out / "figures"):
            made = comparison_figures(out, spec, records, rows) if figures else []
        write_results(out, spec, records, rows, command=command or f"compare({spec!r})",
                      wall_seconds=time.perf_counter() - start, figures=made)
    except KeyboardInterrupt as e:  # replaces the hint of the run that was training
        e.resume_hint = (f"finished runs are kept in {out}; rerun `pdiff compare ... --resume` "
                         "with the same options to continue")
        raise
    return Comparison(spec, records, rows, made)


# -- summaries -------------------------------------------------------------------------------------

def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
    return m, math.sqrt(var / len(v))


def summarize(records: list[dict]) -> list[dict]:
    """One row per cell, in grid order: means and standard errors across the seeds that
    finished, the failed seeds named."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault(tuple(r["cell"].items()), []).append(r)
    out = []
    for key, rs in rows.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        ev = [r["eval"] for r in ok]
        row = {"cell": dict(key), "runs": len(rs), "ok": len(ok),
               "failed": {r["name"]: r.get("error", "") for r in rs if r.get("status") != "ok"}}
        for key, values in {
            "nll_nats": [e["nll_nats"] for e in ev],
            "bits_per_dim": [e.get("bits_per_dim") for e in ev],
            "gap_nats": [e.get("gap_nats") for e in ev],
            "prior_nats": [e["prior_nats"] for e in ev],
            "decoder_nats": [e["terms_nats"][0] for e in ev],
            "transition_nats": [sum(e["terms_nats"][1:]) for e in ev],
            "energy_distance": [e.get("energy_distance") for e in ev],
            "sliced_wasserstein": [e.get("sliced_wasserstein") for e in ev],
            "train_seconds": [r.get("train_seconds") for r in ok],
            "train_cpu_seconds": [r.get("train_cpu_seconds") for r in ok],
            "bound_seconds": [e.get("wall_seconds") for e in ev],
            "fid": [e.get("fid") for e in ev],
            "sample_precision": [e.get("sample_precision") for e in ev],
            "sample_recall": [e.get("sample_recall") for e in ev],
            **{f"{name}_{k}": [e[name][k] if name in e else None for e in ev]
               for name in ("continuous", "ode")
               for k in ("nll_nats", "bits_per_dim", "wall_seconds")},
        }.items():
            row[key], row[key + "_se"] = _mean_se(values)
        if ev:
            row["num_dims"] = ev[0].get("dim")
            T = len(ev[0]["terms_nats"])
            row["terms_nats"] = [sum(e["terms_nats"][i] for e in ev) / len(ev) for i in range(T)]
        out.append(row)
    return out


def _fmt(m, se, digits: int = 3) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def results_table(rows: list[dict], *, image: bool = False) -> str:
    """The summary as a Markdown table (what ``pdiff compare`` prints): one column per axis.

    For images the bound and its terms are in bits per dimension (no entropy is known)."""
    axes = list(rows[0]["cell"]) if rows else []
    others = [name for name in ("continuous", "ode")
              if any(r.get(f"{name}_nll_nats") is not None for r in rows)]
    if others:
        return _likelihood_table(rows, axes, others, image)
    fid = image and any(r.get("fid") is not None for r in rows)
    if image:
        cols = axes + ["seeds ok", "bits/dim", "L_T (bpd)", "L_0 (bpd)", "Σ L_{t-1} (bpd)",
                       "energy distance", "sliced W2", "train s (wall / CPU)"]
        if fid:
            cols[-1:-1] = ["FID", "precision", "recall"]
    else:
        cols = axes + ["seeds ok", "NLL bound (nats)", "gap to H (nats)", "L_T", "L_0", "Σ L_{t-1}",
                       "energy distance", "sliced W2", "train s (wall / CPU)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cell = [str(v) for v in r["cell"].values()]
        ok = f"{r['ok']}/{r['runs']}"
        if r["ok"] == 0:
            reason = next(iter(r["failed"].values()), "").replace("|", "/")[:80]
            lines.append("| " + " | ".join(cell + [ok, f"failed: {reason}"]
                                          + [""] * (len(cols) - len(cell) - 2)) + " |")
            continue
        if r["failed"]:
            ok += " (failed: " + ", ".join(r["failed"]) + ")"
        if image:
            bpd = lambda v: None if v is None else v / (r["num_dims"] * math.log(2))  # noqa: E731
            bound = [_fmt(r["bits_per_dim"], r["bits_per_dim_se"]), _fmt(bpd(r["prior_nats"]), None, 4),
                     _fmt(bpd(r["decoder_nats"]), None), _fmt(bpd(r["transition_nats"]), None)]
        else:
            bound = [_fmt(r["nll_nats"], r["nll_nats_se"]), _fmt(r["gap_nats"], r["gap_nats_se"]),
                     _fmt(r["prior_nats"], None, 4), _fmt(r["decoder_nats"], None),
                     _fmt(r["transition_nats"], None)]
        quality = ([_fmt(r["fid"], r["fid_se"], 2), _fmt(r["sample_precision"], r["sample_precision_se"]),
                    _fmt(r["sample_recall"], r["sample_recall_se"])] if fid else [])
        lines.append("| " + " | ".join(cell + [ok] + bound + [
            _fmt(r["energy_distance"], r["energy_distance_se"], 4),
            _fmt(r["sliced_wasserstein"], r["sliced_wasserstein_se"])] + quality + [
            _fmt(r["train_seconds"], None, 0) + " / " + _fmt(r["train_cpu_seconds"], None, 0)]) + " |")
    return "\n".join(lines)


def _likelihood_table(rows: list[dict], axes: list[str], others: list[str], image: bool) -> str:
    """The estimators side by side: the discrete bound, the continuous-time bound, the ODE NLL
    (nats, or bits/dim for images), each with its standard error across seeds and its wall time."""
    unit, key = ("bits/dim", "bits_per_dim") if image else ("nats", "nll_nats")
    names = {"continuous": "continuous bound", "ode": "ODE NLL"}
    cols = axes + ["seeds ok", f"discrete bound ({unit})", "bound s"]
    for name in others:
        cols += [f"{names[name]} ({unit})", f"{name} s"]
    if not image:
        cols.append("entropy gap of the bound (nats)")
    fid = any(r.get("fid") is not None for r in rows)
    if fid:
        cols += ["FID", "precision", "recall"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cell = [str(v) for v in r["cell"].values()] + [f"{r['ok']}/{r['runs']}"]
        if r["ok"] == 0:
            lines.append("| " + " | ".join(cell + ["failed"] + [""] * (len(cols) - len(cell) - 1))
                         + " |")
            continue
        cell += [_fmt(r[key], r[key + "_se"]), _fmt(r["bound_seconds"], None, 2)]
        for name in others:
            cell += [_fmt(r[f"{name}_{key}"], r[f"{name}_{key}_se"]),
                     _fmt(r[f"{name}_wall_seconds"], None, 2)]
        if not image:
            cell.append(_fmt(r["gap_nats"], r["gap_nats_se"]))
        if fid:
            cell += [_fmt(r["fid"], r["fid_se"], 2), _fmt(r["sample_precision"], r["sample_precision_se"]),
                     _fmt(r["sample_recall"], r["sample_recall_se"])]
        lines.append("| " + " | ".join(cell) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


_TABLE_NOTE_TOY = (
    "NLL bound: L_T + Σ L_{t-1} + L_0 in nats (data units), mean over seeds ± its standard "
    "error across seeds. Gap: bound minus entropy, paired over the same test points. "
    "L_T, L_0 and Σ L_{t-1} (t = 2..T): the mean nats of the prior, decoder and transition "
    "terms (L_0 is a log density, negative for continuous data, so the terms are shown in "
    "nats rather than as fractions of the total). Energy distance (unbiased; about 0 for a "
    "perfect model) and sliced Wasserstein-2: model samples against held-out test points.")
_TABLE_NOTE_LIKELIHOODS = (
    "Each estimator of -log p(x) on the same test points of each run, mean over seeds ± its "
    "standard error across seeds, with its wall time per run in seconds: the discrete bound "
    "L_T + Σ L_{t-1} + L_0 of the T-step chain; the continuous-time bound (VDM) of the same "
    "network on its schedule seen in continuous time; the probability-flow ODE's NLL (Song et "
    "al. 2021), exact up to the solver's tolerance (images: dequantized, a bound on the discrete "
    "NLL). Each run's own standard errors and the ODE's evaluations and tolerances are in "
    "results.json (runs[].eval.continuous, runs[].eval.ode).")
_TABLE_NOTE_IMAGE = (
    "bits/dim: the bound L_T + Σ L_{t-1} + L_0 on the discrete test images (discretized decoder "
    "over the dataset's K levels) divided by D ln 2, mean over seeds ± its standard error across "
    "seeds; L_T, L_0 and Σ L_{t-1} (t = 2..T): the prior, decoder and transition terms in bits/dim "
    "(they add up to the bound). Energy distance (unbiased; about 0 for a perfect model) and sliced "
    "Wasserstein-2: model samples against held-out test images, as vectors of pixels in [-1, 1].")


def write_results(out: str | Path, spec: GridSpec, records: list[dict], rows: list[dict], *,
                  command: str, wall_seconds: float, figures: Iterable[str] = ()) -> None:
    """``results.json`` (everything, per run and per row) and ``results.md`` (the table, the
    command, the machine), each written atomically, the pair together: results.md is written
    inside the write of results.json, which is replaced only once it is (a full disk leaves both
    old files)."""
    out = Path(out)
    image = is_image_data(spec.base.data)
    entropy = (None, None) if image else entropy_mc(
        get_toy(spec.base.data), 100_000, generator=torch.Generator().manual_seed(1_000_003))
    info = machine_info()
    doc = {"command": command, "machine": info, "wall_seconds": wall_seconds,
           "base_config": asdict(spec.base), "axes": {k: list(v) for k, v in spec.axes.items()},
           "seeds": list(spec.seeds), "exclude": list(spec.exclude),
           "eval_samples": spec.eval_samples, "metric_samples": spec.metric_samples,
           "entropy_nats": entropy[0], "entropy_stderr": entropy[1],
           "summary": rows, "runs": records,
           "figures": [Path(f).relative_to(out).as_posix() for f in figures]}
    b = spec.base
    ent = (f"{entropy[0]:.4f} ± {entropy[1]:.4f} nats" if entropy[0] is not None
           else "unknown (no closed-form density)")
    best = min((r for r in rows if r["ok"]), key=lambda r: r["nll_nats"], default=None)
    md = [f"# pdiff compare: {b.data}", "",
          f"Command: `{command}`", "",
          f"Measured {info['date']} on {info['cpus']} CPUs ({info['platform']}, torch {info['torch']}"
          + (f", {info['cuda']}" if info["cuda"] else "") + f"); {wall_seconds / 60:.1f} min wall.", "",
          f"Data entropy H: {ent}. Grid: " + "; ".join(f"{k} in {{{', '.join(map(str, v))}}}"
                                                      for k, v in spec.axes.items())
          + "".join(f", without {'/'.join(map(str, e.values()))}" for e in spec.exclude)
          + f"; seeds {', '.join(map(str, spec.seeds))}. Fixed: " + ", ".join(
              f"{k} {v}" for k, v in asdict(b).items()
              if k not in spec.axes and k not in ("seed", "log_every", "checkpoint_every", "data"))
          + f". Bound on {spec.eval_samples} test points per run, sample metrics on "
          f"{spec.metric_samples}.",
          "",
          results_table(rows, image=image), "",
          (_TABLE_NOTE_LIKELIHOODS if spec.likelihoods
           else _TABLE_NOTE_IMAGE if image else _TABLE_NOTE_TOY), ""]
    if best is not None:
        md += [f"Lowest bound: **{spec.label(best['cell'])}**, "
               + (f"{_fmt(best['bits_per_dim'], best['bits_per_dim_se'])} bits/dim." if image else
                  f"{_fmt(best['nll_nats'], best['nll_nats_se'])} nats."), ""]
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        md += ["Failed runs:", ""] + [f"- {r['name']}: {r.get('error', '')}" for r in failed] + [""]
    if figures:
        md += ["Figures:", ""] + [f"- [{Path(f).name}]({Path(f).relative_to(out).as_posix()})"
                                  for f in figures] + [""]

    def write_pair(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(_strict(doc), indent=1), encoding="utf-8")
        with _writing(out / "results.md"):
            atomic_write_text("\n".join(md), out / "results.md")

    with _writing(out / "results.json"):
        atomic_write(out / "results.json", write_pair)


def _strict(obj):
    """``obj`` with every non-finite float as ``None``: results files are strict JSON (RFC 8259),
    and a failed run's partial numbers are not results."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


# -- figures ---------------------------------------------------------------------------------------

def _first_schedule(spec: GridSpec):
    """(schedule, name, T) of the grid's first cell: its schedule, T and endpoints, or the betas
    of its ``--betas`` file."""
    from .data.arrays import load_betas
    from .schedules import NoiseSchedule, make_schedule

    cfg = replace(spec.base, **spec.cells()[0])
    if cfg.betas:
        return NoiseSchedule.from_betas(load_betas(cfg.betas), warn=False), "custom", cfg.timesteps
    return (make_schedule(cfg.schedule, cfg.timesteps, warn=False, **cfg.schedule_options()),
            cfg.schedule, cfg.timesteps)


def comparison_figures(out: str | Path, spec: GridSpec, records: list[dict], rows: list[dict], *,
                       seed: int = 0) -> list[Path]:
    """The tutorials' figures for a finished grid, into ``out/figures``: the data, the schedule,
    the forward diffusion (PNG and GIF), the per-t bound terms of every cell on
    one plot, loss curves per objective, every model's samples against the data, for 2D data the
    reverse chains of each cell's first seed as a GIF (``reverse_<cell>.gif``), and for the run
    with the lowest bound its predicted against true noise, reverse chains and noise field."""
    from . import figures as F
    from .data import fit_rescaling

    fig_dir = Path(out) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    base = spec.base
    if is_image_data(base.data):
        return _image_comparison_figures(fig_dir, spec, records, rows, seed=seed)
    data = get_toy(base.data)
    dim = data.event_shape[0]
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    train, test = toy_split(data, 2000, 2000, base.seed)
    density = data.log_prob if has_exact_density(data) else None
    rescaling = fit_rescaling(base.rescale, data, dim)
    x0 = rescaling.apply(train.double())
    # the schedule figures show the first schedule of the grid (or the base one)
    schedule, sched_name, T = _first_schedule(spec)
    made = [F.plot_data(train, fig_dir / "data.png", title=f"{base.data}: training data", density=density),
            F.plot_schedule(schedule, fig_dir / "schedule.png", title=f"{sched_name} schedule, T = {T}"),
            F.plot_forward_diffusion(schedule, x0[:1000], fig_dir / "forward.png", generator=gen()),
            F.animate_forward_diffusion(schedule, x0[:1000], fig_dir / "forward.gif", generator=gen())]
    ok_rows = [r for r in rows if r["ok"]]
    if ok_rows:
        made.append(F.plot_bound_terms({spec.label(r["cell"]): r["terms_nats"] for r in ok_rows},
                                       fig_dir / "bound_terms.png", logx=True,
                                       title=f"{base.data}: mean term of each step t (nats)"))
    first_seed = [r for r in records if r["seed"] == spec.seeds[0]]
    made += _loss_figures(fig_dir, spec, first_seed)
    samples = {}
    for r in first_seed:
        path = Path(r["run_dir"]) / SAMPLES_FILE
        if r.get("status") == "ok" and path.is_file():
            samples[spec.label(r["cell"])] = torch.load(path)
    if samples:
        made.append(F.plot_samples_grid(samples, test, fig_dir / "samples.png", density=density,
                                        title=f"{base.data}: samples of each model (seed "
                                              f"{spec.seeds[0]}) against held-out data"))
    if dim == 2:  # the reverse chains of each cell's first seed, x_T to x_0 over the test data
        for r in first_seed:
            if r.get("status") == "ok":
                run = load_run(r["run_dir"])
                xs = run.rescaling.apply(test.double()).float()
                name = "reverse_" + "-".join(str(v) for v in r["cell"].values()) + ".gif"
                made.append(F.animate_reverse(run.model, xs[:1000], fig_dir / name, generator=gen()))
    best = min(ok_rows, key=lambda r: r["nll_nats"], default=None)
    if best is not None:
        rec = next((r for r in records if r["cell"] == best["cell"] and r.get("status") == "ok"), None)
        if rec is not None:
            run = load_run(rec["run_dir"])
            xs = run.rescaling.apply(test.double()).float()
            made.append(F.plot_noise_prediction(run.model, xs[:1000], fig_dir / "best_noise_prediction.png",
                                                generator=gen()))
            made.append(F.plot_reverse(run.model, xs[:1000], fig_dir / "best_reverse.png", generator=gen()))
            made.append(F.plot_noise_field(run.model, fig_dir / "best_noise_field.png", dim=dim,
                                           lim=float(xs.abs().max()) * 1.1, dtype=torch.float32))
            atomic_write_text(f"figures best_*.png: run {rec['name']} ({spec.label(best['cell'])})\n",
                              fig_dir / "best_run.txt")
    return made


def _loss_figures(fig_dir: Path, spec: GridSpec, first_seed: list[dict]) -> list[Path]:
    """Loss curves: one figure per objective (their scales differ), one curve per other cell value."""
    from . import figures as F

    base, made = spec.base, []
    by_objective: dict[str, dict] = {}
    for r in first_seed:
        objective = r["cell"].get("objective", base.objective)
        rest = {k: v for k, v in r["cell"].items() if k != "objective"}
        path = Path(r["run_dir"]) / "metrics.jsonl"
        lines = ([json.loads(ln) for ln in path.read_text().splitlines() if ln]
                 if path.is_file() else [])
        if lines:
            by_objective.setdefault(objective, {})[spec.label(rest) if rest else objective] = (
                [ln["step"] for ln in lines], [ln["loss"] for ln in lines])
    for objective, curves in by_objective.items():
        made.append(F.plot_loss_curves(curves, fig_dir / f"loss_{objective}.png",
                                       ylabel=f"{objective} loss", logy=objective not in BOUND_OBJECTIVES,
                                       title=f"{base.data}: {objective} loss (seed {spec.seeds[0]})"))
    return made


def _image_comparison_figures(fig_dir: Path, spec: GridSpec, records: list[dict], rows: list[dict],
                              *, seed: int = 0) -> list[Path]:
    """Images: the data, the forward diffusion of a few test images, per-t terms in bits/dim, loss
    curves, every model's samples, and for the run with the lowest bound its denoising
    progression and its x_0 predicted from x_t at several t."""
    from . import image_figures as IF

    base = spec.base
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    data = load_run_data(base, train=False)
    K, test = data.num_levels, data.test
    schedule, sched_name, T = _first_schedule(spec)
    made = [IF.plot_image_grid(test[:64], fig_dir / "data.png", num_levels=K,
                               title=f"{base.data}: test images"),
            IF.plot_forward_images(schedule, test[:4], fig_dir / "forward.png",
                                   num_levels=K, generator=gen(),
                                   title=f"forward diffusion q(x_t | x_0), {sched_name}, T = {T}")]
    ok_rows = [r for r in rows if r["ok"]]
    if ok_rows:
        made.append(IF.plot_bound_terms_bpd({spec.label(r["cell"]): r["terms_nats"] for r in ok_rows},
                                            fig_dir / "bound_terms.png", num_dims=data.num_dims,
                                            title=f"{base.data}: mean term of each step t"))
    first_seed = [r for r in records if r["seed"] == spec.seeds[0]]
    made += _loss_figures(fig_dir, spec, first_seed)
    for r in first_seed:
        path = Path(r["run_dir"]) / SAMPLES_FILE
        if r.get("status") == "ok" and path.is_file():
            name = "samples_" + "-".join(str(v) for v in r["cell"].values()) + ".png"
            made.append(IF.plot_image_grid(torch.load(path)[:64], fig_dir / name, num_levels=K,
                                           title=f"{spec.label(r['cell'])} (seed {r['seed']})"))
    best = min(ok_rows, key=lambda r: r["bits_per_dim"], default=None)
    if best is not None:
        rec = next((r for r in records if r["cell"] == best["cell"] and r.get("status") == "ok"), None)
        if rec is not None:
            run = load_run(rec["run_dir"])
            made.append(IF.plot_denoising_progression(run.model, fig_dir / "best_progression.png",
                                                      num_levels=K, image_shape=data.event_shape,
                                                      generator=gen()))
            made.append(IF.plot_x0_predictions(run.model, test[:6].float(), fig_dir / "best_x0_predictions.png",
                                               num_levels=K, generator=gen()))
            atomic_write_text(f"figures best_*.png: run {rec['name']} ({spec.label(best['cell'])})\n",
                              fig_dir / "best_run.txt")
    return made
