r"""Benchmarks: the full bound and training, each timed against a baseline in the same run.

    python -m pdiff.bench                    # every section; writes docs/benchmarks.md and JSON
    python -m pdiff.bench --quick --out-json /tmp/b.json --out-md /tmp/b.md   # tiny settings

Machines here are shared and noisy, so every figure is a ratio to a baseline measured in the same
process: the two are run alternately (one warm-up call each, then ``repeats`` calls each, the order
reversed every other round) and the ratio is the median of the per-round ratios. Sections:

  full_bound  ``elbo.full_bound`` over N x T (example, step) pairs against the bare network's
              forward passes on as many (x_t, t) pairs in chunks of the same size (target 1.2x).
  training    ``Trainer`` iterations (torch engine; logging and checkpoints at their default
              intervals) against a hand-written loop doing the same arithmetic with the same
              network and batch (target: 5% overhead); MLPs, the digits U-Net and the MNIST U-Net
              (images/s), the last on the MNIST files where found, else random images of their
              shape.
  profile     where an MNIST U-Net training step goes (``bench_profile``): convolutions,
              attention, GroupNorm, the loss, data, the optimizer, at each thread count.
  pyro        the Pyro engine against the torch computation of the same estimator (target 1.5x).
  growth      the full bound's cost as T, N and the data dimension D grow.
  cuda        on a CUDA device: an MNIST-sized U-Net's training images/s and full-bound time,
              eager fp32 against bf16 autocast + ``torch.compile``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bench_baselines import HandLoop, chain_mean_field_bound
from .bench_profile import COMPONENTS, conv_macs, profile_steps
from .data.images import IDX_FILES, IDX_SOURCES
from .runtime import set_threads, threads_note, tune_allocator
from .distributions.discretized import quantize
from .elbo import full_bound
from .files import atomic_write, atomic_write_text, unwritable
from .evaluation import chunk_for_budget
from .nets import UNet, unet_for
from .objectives import hybrid_loss, make_sampler
from .train import TrainConfig, Trainer, build_model, build_net, check_device, wrap_precision

SECTIONS = ("full_bound", "training", "profile", "pyro", "growth", "cuda")
TARGETS = {"full_bound": 1.2, "training": 1.05, "pyro": 1.5}
TOY = "8gaussians"  # the 2D toy the MLP cases train on
F32 = torch.float32  # what Trainer trains in, whatever the default dtype
MNIST_SIZE = 28
# where the MNIST files are looked for when --mnist-dir is not given (the project's data copy)
MNIST_DIRS = ("../shared/data/mnist",)


@dataclass(frozen=True)
class Settings:
    """Sizes of every measurement (``QUICK`` for the smoke test)."""

    repeats: int = 7
    # the 5% target needs many rounds on a noisy machine: the MLP's iterations are short (50 per
    # call take ~0.1 s, per-round ratios spread by ~10%), so 101 rounds put the median's 95%
    # interval at about +-2%; the trajectory's and the U-Net's calls are longer and steadier
    training_repeats: int = 101
    slow_training_repeats: int = 21
    timesteps: int = 1000
    mlp_examples: int = 64  # N of the MLP's full bound: N x T pairs
    unet_examples: int = 2
    mnist_examples: int = 1  # the MNIST U-Net's full bound: T passes of ~20 ms each on a CPU core
    mnist_repeats: int = 3
    batch: int = 256  # the toy MLP's default batch
    unet_batch: int = 64  # the image default batch
    segment: int = 50  # Trainer iterations per timed call: one log line each, as by default
    unet_segment: int = 5
    trajectory_segment: int = 1
    pyro_batch: int = 16
    pyro_segment: int = 2
    growth_timesteps: tuple[int, ...] = (100, 250, 500, 1000, 2000, 4000)
    growth_examples: tuple[int, ...] = (1, 4, 16, 64, 256)
    growth_dims: tuple[int, ...] = (1, 2, 8, 32, 64)
    growth_n: int = 16
    growth_repeats: int = 3
    cuda_batch: int = 128
    cuda_examples: int = 8
    cuda_repeats: int = 10
    # the MNIST U-Net's training case and profile: image size (28: the MNIST files if found),
    # the image default batch, one iteration per call (~3 s on a CPU core)
    mnist_size: int = MNIST_SIZE
    mnist_batch: int = 64
    mnist_segment: int = 1
    mnist_training_repeats: int = 21
    profile_threads: tuple[int, ...] = (1, 2)
    profile_steps: int = 3
    # the default U-Net's training speed against the same U-Net at the width of the old default
    width_baseline: int = 64
    width_repeats: int = 7


QUICK = Settings(repeats=1, training_repeats=1, slow_training_repeats=1, timesteps=20,
                 mlp_examples=4, unet_examples=1, mnist_examples=1, mnist_repeats=1, batch=16, unet_batch=2, segment=2,
                 unet_segment=1, trajectory_segment=1, pyro_batch=2, pyro_segment=1,
                 growth_timesteps=(10, 20), growth_examples=(1, 2), growth_dims=(1, 2),
                 growth_n=2, growth_repeats=1, cuda_batch=4, cuda_examples=1, cuda_repeats=2,
                 mnist_size=8, mnist_batch=2, mnist_segment=1, mnist_training_repeats=1,
                 profile_threads=(1,), profile_steps=1, width_baseline=16, width_repeats=1)


# -- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(calls: dict[str, Callable[[], float | None]], repeats: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, run alternately after one warm-up call each. A call may
    return seconds of its own to leave out (time spent writing a checkpoint, say)."""
    for fn in calls.values():
        fn()
    names, times = list(calls), {name: [] for name in calls}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            excluded = calls[name]()
            _sync(device)
            excluded = excluded if isinstance(excluded, float) else 0.0
            times[name].append(time.perf_counter() - start - excluded)
    return times


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``: the order statistics
    x_(k) and x_(n+1-k) with k the largest rank such that P(Binomial(n, 1/2) < k) <= (1 - level)/2,
    which covers the median with probability at least ``level`` whatever the distribution. With
    too few values for that (n < 6 at 95%) it is their whole range."""
    xs, n = sorted(values), len(values)
    tail, k, cdf = (1 - level) / 2, 0, 0.0  # cdf = P(B <= k - 1) before each step
    while k < n and cdf + math.comb(n, k) / 2**n <= tail:
        cdf += math.comb(n, k) / 2**n
        k += 1
    return (xs[0], xs[-1]) if k == 0 else (xs[k - 1], xs[n - k])


def versus(times: dict[str, list[float]], name: str, baseline: str, per: int = 1) -> dict:
    """``name`` against ``baseline``: median seconds (per ``per`` units) and the median of the
    per-round ratios, with a 95% confidence interval for that median and their range; and, as a
    second estimator, the ratio of the two fastest calls (interference from other jobs only ever
    adds time, so each side's fastest call is its least disturbed one)."""
    ratios = sorted(a / b for a, b in zip(times[name], times[baseline]))
    return {"seconds": statistics.median(times[name]) / per,
            "baseline_seconds": statistics.median(times[baseline]) / per,
            "ratio": statistics.median(ratios), "ratio_ci": list(median_interval(ratios)),
            "ratio_range": [ratios[0], ratios[-1]], "repeats": len(ratios),
            "fastest_ratio": min(times[name]) / min(times[baseline])}


def _judge(result: dict, target: float) -> dict:
    return {**result, "target": target, "met": result["ratio"] <= target}


# -- a: the full bound against the bare network --------------------------------------------------

def _mlp_model(timesteps: int, dim: int = 2, device="cpu"):
    cfg = TrainConfig(data=TOY, timesteps=timesteps)
    net = build_net(cfg, (dim,)).to(device, F32).eval()
    return build_model(cfg, net), torch.zeros(1, dim, device=device, dtype=F32)


def _unet_model(timesteps: int, device="cpu", data: str = "digits", size: int = 8,
                levels: int = 17):
    """The default U-Net of ``data`` (images of ``size`` x ``size``, ``levels`` grey levels)."""
    cfg = TrainConfig.for_data(data, timesteps=timesteps)
    net = build_net(cfg, (1, size, size)).to(device, F32).eval()
    like = torch.zeros(1, 1, size, size, device=device, dtype=F32)
    return build_model(cfg, net, num_levels=levels), like


def full_bound_vs_bare(model, like: torch.Tensor, n: int, *, repeats: int, device,
                       chunk_size: int | None = 16384) -> dict:
    """Time ``full_bound`` on ``n`` examples and the network alone on as many (x_t, t) pairs,
    ``chunk_size`` pairs per call (None: what ``pdiff evaluate`` chooses, the memory budget's)."""
    T, shape = model.num_timesteps, (n,) + like.shape[1:]
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(shape, generator=gen, device=device, dtype=F32) * 2 - 1
    if model.decoder_type == "discretized":
        x0 = quantize(x0, model.num_levels)
    if chunk_size is None:
        chunk_size = chunk_for_budget(model, x0)
    pairs = n * T
    xt = torch.randn((pairs,) + like.shape[1:], generator=gen, device=device, dtype=F32)
    t = torch.arange(pairs, device=device) % T + 1

    def bare():
        with torch.no_grad():
            for start in range(0, pairs, chunk_size):
                model.net(xt[start:start + chunk_size], t[start:start + chunk_size])

    calls = {"full_bound": lambda: full_bound(model, x0, chunk_size=chunk_size, generator=gen),
             "bare_network": bare}
    result = versus(interleave(calls, repeats, device), "full_bound", "bare_network")
    return {**result, "N": n, "T": T, "pairs": pairs, "chunk_size": chunk_size,
            "dims": math.prod(like.shape[1:]),
            "us_per_pair": 1e6 * result["seconds"] / pairs}


def bench_full_bound(s: Settings, device) -> list[dict]:
    T = s.timesteps
    mnist = _unet_model(T, device=device, data="mnist", size=28, levels=256)
    cases = [("MLP 3x128, 2D toy", _mlp_model(T, device=device), s.mlp_examples, s.repeats, 16384),
             ("U-Net, 8x8 digits", _unet_model(T, device=device), s.unet_examples, s.repeats,
              16384),
             # the chunk pdiff evaluate picks for this network under its default memory budget
             ("U-Net, 28x28 MNIST, chunk by memory budget", mnist, s.mnist_examples,
              s.mnist_repeats, None)]
    out = []
    for name, (model, like), n, repeats, chunk in cases:
        out.append(_judge({"case": name, **full_bound_vs_bare(model, like, n, repeats=repeats,
                                                             device=device, chunk_size=chunk)},
                          TARGETS["full_bound"]))
    return out


# -- b: training against a hand-written loop ------------------------------------------------------

class TrainerSegments:
    """Runs a ``Trainer`` ``k`` iterations per call, with logging at its default interval; the time
    of the checkpoint written at the end of each call is returned (left out of the timing) and
    added back amortized over ``checkpoint_every``, the default interval."""

    def __init__(self, trainer: Trainer, k: int):
        self.trainer, self.k, self.saves = trainer, k, []
        real_save = trainer.save

        def timed_save():
            start = time.perf_counter()
            real_save()
            self.saves.append(time.perf_counter() - start)
        trainer.save = timed_save

    def __call__(self) -> float:
        before = len(self.saves)
        self.trainer.cfg.iterations = self.trainer.step + self.k
        self.trainer.train(progress=False)
        return sum(self.saves[before:])

    @property
    def amortized_save(self) -> float:
        return statistics.median(self.saves) / self.trainer.cfg.checkpoint_every


def _trainer(cfg: TrainConfig, root: Path, name: str) -> Trainer:
    return Trainer(cfg, root / name)


def trainer_vs(cfg: TrainConfig, root: Path, name: str, k: int, baseline: Callable[[], None],
               *, repeats: int, device, trainer: Trainer | None = None) -> dict:
    """Trainer iterations (``k`` per call) against ``baseline`` (``k`` iterations per call)."""
    trainer = trainer or _trainer(cfg, root, name)
    segments = TrainerSegments(trainer, k)
    times = interleave({"trainer": segments, "baseline": baseline}, repeats, device)
    for name, runner in (("trainer", segments), ("baseline", baseline)):
        if isinstance(runner, TrainerSegments):
            times[name] = [x + k * runner.amortized_save for x in times[name]]
    result = versus(times, "trainer", "baseline", per=k)
    return {**result, "checkpoint_seconds": statistics.median(segments.saves),
            "checkpoint_every": cfg.checkpoint_every, "batch": cfg.batch_size,
            "T": cfg.timesteps, "iterations_per_call": k}


def _has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` (or its torchvision layout) holds the four MNIST IDX files."""
    dirs = (folder, folder / IDX_SOURCES["mnist"][0] / "raw")
    return all(any((d / (f + s)).is_file() for d in dirs for s in ("", ".gz")) for f in IDX_FILES)


def _random_idx(folder: Path, size: int, train: int = 4096, test: int = 16) -> None:
    """MNIST-like IDX files of uniformly random ``size`` x ``size`` 8-bit images and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem in IDX_FILES:
        n = train if stem.startswith("train") else test
        images = "images" in stem
        arr = rng.integers(0, 256 if images else 10, (n, size, size) if images else (n,),
                           dtype=np.uint8)
        header = (2051 if images else 2049).to_bytes(4, "big")
        header += b"".join(d.to_bytes(4, "big") for d in arr.shape)
        (folder / stem).write_bytes(header + arr.tobytes())


def mnist_data(root: Path, size: int, mnist_dir: str | None = None) -> tuple[str, str]:
    """A folder of MNIST IDX files at ``size`` x ``size`` and what it holds: the MNIST files
    (``mnist_dir``, else the first of ``MNIST_DIRS`` that holds them) when ``size`` is theirs,
    28; otherwise random images on the 256-level grid written under ``root``, so the benchmark
    needs no data files. Only the images' shape matters to the timing."""
    candidates = (mnist_dir,) if mnist_dir else MNIST_DIRS
    found = [Path(d) for d in candidates if _has_idx_files(Path(d))]
    if size == MNIST_SIZE and found:
        return str(found[0]), f"the MNIST files in {found[0]}"
    folder = root / f"random-mnist-{size}"
    if not _has_idx_files(folder):
        _random_idx(folder, size)
    return str(folder), f"random {size}x{size} images on the 256-level grid (MNIST's shape)"


def bench_training(s: Settings, device, root: Path, mnist_dir: str | None = None) -> list[dict]:
    common = dict(timesteps=s.timesteps, iterations=10**9, train_size=20_000, test_size=100,
                  device=str(device))
    cases = [("MLP 3x128, 2D toy", TOY, obj, s.batch, s.segment, s.training_repeats, {})
             for obj in ("simple", "vlb", "hybrid")]
    cases += [("MLP 3x128, 2D toy", TOY, "trajectory", s.batch, s.trajectory_segment,
               s.slow_training_repeats, {})]
    cases += [("U-Net, 8x8 digits", "digits", obj, s.unet_batch, s.unet_segment,
               s.slow_training_repeats, {}) for obj in ("simple", "hybrid")]
    # the image default objective (hybrid) on the default MNIST U-Net
    folder, held = mnist_data(root, s.mnist_size, mnist_dir)
    cases += [(f"U-Net, {s.mnist_size}x{s.mnist_size} MNIST", "mnist", "hybrid", s.mnist_batch,
               s.mnist_segment, s.mnist_training_repeats, {"data_dir": folder, "data": held})]
    out = []
    for case, data, objective, batch, k, repeats, extra in cases:
        cfg = TrainConfig.for_data(data, objective=objective, batch_size=batch,
                                   data_dir=extra.get("data_dir"), **common)
        trainer = _trainer(cfg, root, f"{data}-{objective}")
        net = build_net(cfg, trainer.event_shape).to(device, F32)
        net.load_state_dict(trainer.net.state_dict())
        hand = HandLoop(replace(cfg), net, trainer.train_x, trainer.num_levels, device)  # a copy:
        # TrainerSegments moves the trainer's cfg.iterations
        result = trainer_vs(cfg, root, case, k, lambda: hand.run(k), repeats=repeats,
                            device=device, trainer=trainer)
        result |= {"examples_per_s": batch / result["seconds"],
                   "baseline_examples_per_s": batch / result["baseline_seconds"],
                   "shape": list(trainer.event_shape)}
        if "data" in extra:
            result["data"] = extra["data"]
        out.append(_judge({"case": case, "objective": objective, **result}, TARGETS["training"]))
        del trainer, hand, net  # the MNIST U-Net's weights, optimizer and data: ~0.3 GB
    return out


# -- b': where an MNIST training step goes ------------------------------------------------------

def bench_profile(s: Settings, device, root: Path, mnist_dir: str | None = None) -> dict:
    """``bench_profile.profile_steps`` on the default MNIST U-Net's ``Trainer`` (hybrid objective,
    the image defaults) at each of ``s.profile_threads``: milliseconds per step by component."""
    if device.type != "cpu":
        return {"skipped": "the profile charges each op its CPU time: it measures CPU training"}
    folder, held = mnist_data(root, s.mnist_size, mnist_dir)
    cfg = TrainConfig.for_data("mnist", data_dir=folder, batch_size=s.mnist_batch,
                               timesteps=s.timesteps, iterations=1, device=str(device))
    trainer = _trainer(cfg, root, "profile")
    net = trainer.net
    like = trainer.train_x[:1]
    out = {"data": held, "batch": cfg.batch_size, "objective": cfg.objective,
           "shape": list(trainer.event_shape),
           "parameters": sum(p.numel() for p in net.parameters()),
           "base_channels": net.down[0][0].out_channels, "conv_macs": conv_macs(net, like),
           "steps": s.profile_steps, "runs": []}
    before = torch.get_num_threads()
    try:
        for threads in s.profile_threads:
            torch.set_num_threads(threads)
            out["runs"].append({"threads": threads, **profile_steps(trainer, s.profile_steps)})
    finally:
        torch.set_num_threads(before)
    # the default width against the old default's: what the default buys in images/s
    wide_cfg = replace(cfg, channels=s.width_baseline, iterations=10**9)
    wide = TrainerSegments(_trainer(wide_cfg, root, "profile-wide"), s.mnist_segment)
    result = trainer_vs(replace(cfg, iterations=10**9), root, "profile", s.mnist_segment, wide,
                        repeats=s.width_repeats, device=device, trainer=trainer)
    out["width"] = {"baseline_channels": s.width_baseline, "ratio": result["ratio"],
                    "ci": result["ratio_ci"], "images_per_s": cfg.batch_size / result["seconds"],
                    "baseline_images_per_s": cfg.batch_size / result["baseline_seconds"],
                    "threads": torch.get_num_threads()}
    return out


# -- c: the Pyro engine against torch ------------------------------------------------------------

PYRO_VLB_WHY = (
    "TraceMeanField_ELBO needs one sample site per step to take each L_{t-1} as an analytic KL, "
    "and a site's distribution needs the network at x_t, which the previous site draws: T "
    "network calls in sequence on batches of N, each with Pyro's per-site tracing and a KL, "
    "where torch evaluates all N x T pairs in one call. The gap grows with T and shrinks with N; "
    "the pyro engine's trajectory objective (one site for the whole chain) is the fast way to "
    "train through Pyro.")


def bench_pyro(s: Settings, device, root: Path) -> list[dict]:
    common = dict(data=TOY, timesteps=s.timesteps, batch_size=s.pyro_batch, iterations=10**9,
                  train_size=20_000, test_size=100, device=str(device))
    k, out = s.pyro_segment, []
    torch_traj = TrainerSegments(_trainer(TrainConfig(objective="trajectory", **common), root,
                                          "torch-trajectory"), k)
    result = trainer_vs(TrainConfig(objective="trajectory", engine="pyro", **common), root,
                        "pyro-trajectory", k, torch_traj, repeats=s.repeats, device=device)
    out.append(_judge({"case": "trajectory: Trace_ELBO, chain_model/chain_guide vs torch "
                               "trajectory objective", "estimator": "trajectory", **result},
                      TARGETS["pyro"]))
    baseline = _trainer(TrainConfig(objective="vlb", **common), root, "torch-chain-vlb")
    baseline._loss = lambda x0: chain_mean_field_bound(baseline.model, x0).mean()
    result = trainer_vs(TrainConfig(objective="vlb", engine="pyro", **common), root, "pyro-vlb", k,
                        TrainerSegments(baseline, k), repeats=s.repeats, device=device)
    out.append({**_judge({"case": "vlb: TraceMeanField_ELBO, markov.model/posterior_guide vs "
                                  "the same full-chain estimator in torch", "estimator": "vlb",
                          **result}, TARGETS["pyro"]), "why": PYRO_VLB_WHY})
    return out


# -- d: growth ------------------------------------------------------------------------------------

def bench_growth(s: Settings, device) -> dict:
    T, n, r = s.timesteps, s.growth_n, s.growth_repeats
    def run(model_like, n_):
        return full_bound_vs_bare(*model_like, n_, repeats=r, device=device)
    return {
        "T": [{"T": T_, **run(_mlp_model(T_, device=device), n)} for T_ in s.growth_timesteps],
        "N": [{"N": n_, **run(_mlp_model(T, device=device), n_)} for n_ in s.growth_examples],
        "D": [{"D": d, **run(_mlp_model(T, d, device=device), n)} for d in s.growth_dims],
    }


# -- e: CUDA --------------------------------------------------------------------------------------

CUDA_MODES = {"eager_fp32": ("fp32", False), "bf16": ("bf16", False),
              "compile_fp32": ("fp32", True), "bf16_compile": ("bf16", True)}  # precision, compile


def bench_cuda(s: Settings, device: torch.device | None = None,
               modes: tuple[str, ...] = tuple(CUDA_MODES)) -> dict:
    """Eager fp32 against bf16 autocast, torch.compile and both, on a GPU, the network wrapped as
    ``Trainer`` wraps it (``device`` and ``modes`` for tests only)."""
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine"}
        device = torch.device("cuda")
    cfg = TrainConfig.for_data("mnist", timesteps=s.timesteps)
    base = UNet(**unet_for(28, 1, out_multiplier=2)).to(device, F32)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(s.cuda_batch, 1, 28, 28, generator=gen, device=device, dtype=F32)
    images = quantize(images * 2 - 1, 256)
    chunk = s.cuda_examples * s.timesteps // 4 or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    out = {"gpu": name, "batch": s.cuda_batch,
           "examples": s.cuda_examples, "T": s.timesteps, "modes": {}}
    for mode in modes:
        precision, compiled = CUDA_MODES[mode]
        try:
            net = copy.deepcopy(base)
            wrapped = wrap_precision(torch.compile(net) if compiled else net, precision,
                                     device.type)
            model = build_model(cfg, wrapped, num_levels=256)
            opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
            sampler = make_sampler("uniform", s.timesteps)

            def train_step():
                loss = hybrid_loss(model, images, sampler=sampler, generator=gen).loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def evaluate():
                full_bound(model, images[: s.cuda_examples], chunk_size=chunk, generator=gen)

            for _ in range(2):  # compile and autotune outside the timing
                train_step()
                evaluate()
            times = interleave({"train": train_step, "full_bound": evaluate}, s.cuda_repeats,
                               device)
            out["modes"][mode] = {"images_per_s": s.cuda_batch / statistics.median(times["train"]),
                                  "full_bound_seconds": statistics.median(times["full_bound"])}
        except Exception as e:  # torch.compile unavailable on this machine, say
            out["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
    return out


# -- the report -----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "threads_note": threads_note(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def _interval(r: dict) -> tuple[float, float]:
    return r.get("ratio_ci", r["ratio_range"])  # reports written before ratio_ci: the range


def _ratio(r: dict) -> str:
    lo, hi = _interval(r)
    return f"{r['ratio']:.3f} ({lo:.3f}–{hi:.3f})"


def _fastest(r: dict) -> str:
    return f"{r['fastest_ratio']:.3f}" if "fastest_ratio" in r else "–"  # older reports: none


def _per_s(r: dict) -> str:
    if "examples_per_s" not in r:  # older reports
        return "–"
    return f"{r['examples_per_s']:.3g}, {r['baseline_examples_per_s']:.3g}"


def _profile_markdown(p: dict) -> list[str]:
    lines = ["## Where an MNIST training step goes", ""]
    if "skipped" in p:
        return lines + [f"Skipped: {p['skipped']}.", ""]
    C, H, W = p["shape"]
    runs = p["runs"]
    threads = " and ".join(str(r["threads"]) for r in runs)
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    lines += [f"One `Trainer` iteration of the default MNIST U-Net (`unet_for({H}, {C})`, base "
              f"width {p['base_channels']}, {p['parameters'] / 1e6:.2f} M parameters, "
              f"{p['conv_macs'] / 1e6:.0f} M multiply-adds of convolution per image forward), "
              f"{p['objective']} objective, batch {p['batch']}, under `torch.profiler` at "
              f"{threads} {'thread' if threads == '1' else 'threads'}, "
              f"{plural(p['steps'], 'step')} each after one warm-up; data: "
              f"{p['data']}. `pdiff.bench_profile` charges every op its self time: module "
              "scopes for the network's parts, the autograd node's forward op for each backward "
              "op, scopes around the batch, the loss, clipping and the EMA. To rerun it alone: "
              "`python -m pdiff.bench_profile --data mnist --data-dir ../shared/data/mnist "
              "--threads 1`.", "",
              "| component | " + " | ".join(f"{plural(r['threads'], 'thread')}: ms/step | share"
                                           for r in runs) + " |",
              "|---|" + "---|---|" * len(runs)]
    names = list(COMPONENTS) + ["unrecorded"]
    for name in names:
        cells = []
        for r in runs:
            ms = r["unrecorded"] if name == "unrecorded" else r["components"][name]
            cells.append(f"{1e3 * ms:.1f} | {100 * ms / r['wall_seconds']:.1f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **step (wall)** | " + " | ".join(
        f"**{1e3 * r['wall_seconds']:.0f}** | {p['batch'] / r['wall_seconds']:.1f} images/s"
        for r in runs) + " |")
    first = runs[0]
    conv = first["components"]["convolution"]
    gflops = 3 * 2 * p["conv_macs"] * p["batch"] / conv / 1e9 if conv > 0 else float("nan")
    lines += ["", f"At {plural(first['threads'], 'thread')} the convolutions ran at about "
              f"{gflops:.0f} GFLOP/s (three times the forward multiply-adds: the forward pass and "
              "both gradients). The row unrecorded is the step's wall time outside any op: Python "
              "between ops and the profiler's own cost. Other jobs on the machine add time to "
              "every component (see the load average above), and to the small ops most at more "
              "than one thread, whose threads wait for each other.", ""]
    if "width" in p:
        w = p["width"]
        lines += [f"The default width against {w['baseline_channels']}, the default before (same "
                  f"trainer and batch, {plural(w['threads'], 'thread')}, alternating calls): "
                  f"{w['images_per_s']:.3g} against {w['baseline_images_per_s']:.3g} images/s, "
                  f"a step-time ratio of {w['ratio']:.3f} ({w['ci'][0]:.3f}–{w['ci'][1]:.3f}). "
                  "Width and depth are on the command line (`--channels`, `--channel-mults`, "
                  "`--num-res-blocks`).", ""]
    return lines


def _met(r: dict) -> str:
    return "met" if r["met"] else "**not met**"


def _missed(r: dict) -> str:
    lo, hi = _interval(r)
    head = (f"- {r['case']}{' / ' + r['objective'] if 'objective' in r else ''}: ratio "
            f"{r['ratio']:.3f} against {r['target']}, its 95% interval {lo:.3f}–{hi:.3f} over "
            f"{r['repeats']} rounds (per-round range {r['ratio_range'][0]:.2f}–"
            f"{r['ratio_range'][1]:.2f}). ")
    if lo <= r["target"]:
        return head + ("The target lies inside the interval: at this run's noise the two cannot "
                       "be told apart; rerun on a quiet machine or with more rounds.")
    return head + "The whole interval lies above the target: a real overhead, not noise."


def markdown(report: dict) -> str:
    m, sec = report["machine"], report["sections"]
    lines = ["# Benchmarks", "",
             f"Produced by `{report['command']}` on {report['date']}.", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} "
             + (m["threads_note"] if "threads_note" in m else f"with {m['torch_threads']} threads")
             + f", Python {m['python']}"
             + (f", GPU {m['gpu']}" if "gpu" in m else "") + "; load average "
             f"{m['load_average'][0]:.2f} at the start, {report['load_average_end'][0]:.2f} at the "
             "end (other jobs add noise to every figure).", ""]
    if report.get("included"):
        dates: dict[str, list[str]] = {}
        for name, date in report["included"].items():
            dates.setdefault(date, []).append(name)
        here = [n for n in sec if n not in report["included"]]
        merged = "; ".join(f"{', '.join(names)} on {date}" for date, names in dates.items())
        lines += [f"Measured in this run: {', '.join(here) or 'none'}. Merged from earlier "
                  f"reports (`--include-json`), measured under their own load: {merged}.", ""]
    lines += ["Every figure is a ratio to a baseline timed in the same run: the two alternate (one "
              "warm-up call each, the order reversed every round) and the ratio is the median of "
              "the per-round ratios; in brackets, a 95% confidence interval for that median "
              "(order statistics, no assumption on the noise; `bench.median_interval`). A target "
              "counts as met when the median ratio is at or below it. Times are medians.", ""]
    if "full_bound" in sec:
        lines += ["## Full-bound evaluation against the bare network", "",
                  "`elbo.full_bound` (every term of the bound for N examples, the N x T pairs in "
                  "chunks, no gradients) against the network's forward passes on N x T (x_t, t) "
                  f"pairs in chunks of the same size. Target: ≤ {TARGETS['full_bound']}x. The "
                  "MNIST case uses the chunk `pdiff evaluate` picks under its default memory "
                  "budget; where the MNIST evaluation's time and memory went before that, and "
                  "after: docs/results.md, \"Evaluation on MNIST in bounded memory\".", "",
                  "| case | N | T | chunk | full bound (s) | bare network (s) | ratio | target |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['N']} | {r['T']} | {r['chunk_size']} | {r['seconds']:.3g} | "
                  f"{r['baseline_seconds']:.3g} | {_ratio(r)} | {_met(r)} |"
                  for r in sec["full_bound"]]
        lines.append("")
    if "training" in sec:
        rows = sec["training"]
        lines += ["## Training overhead against a hand-written loop", "",
                  "`Trainer` iterations (torch engine, eps prediction, learned_range variance, "
                  "uniform t, logging every 50 steps, a checkpoint every 1000 amortized) against "
                  "`bench.HandLoop`, the same arithmetic written directly in torch with the same "
                  "network, batch, AdamW, clipping and EMA. Target: ≤ "
                  f"{100 * (TARGETS['training'] - 1):.0f}% overhead.", "",
                  "| case | objective | batch | Trainer (ms/it) | hand loop (ms/it) | "
                  "examples/s (Trainer, hand loop) | ratio | overhead | fastest calls' ratio | "
                  "target |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['objective']} | {r['batch']} | {_ms(r['seconds'])} | "
                  f"{_ms(r['baseline_seconds'])} | {_per_s(r)} | {_ratio(r)} | "
                  f"{100 * (r['ratio'] - 1):+.1f}% | {_fastest(r)} | {_met(r)} |" for r in rows]
        lines += ["", "Examples are points for the toy and images for the U-Nets (images/s). The "
                  "fastest calls' ratio is a second estimator of the same overhead: each side's "
                  "fastest call over all rounds, the one other jobs disturbed least. The target "
                  "is judged on the median ratio."]
        few = sorted({r["iterations_per_call"] for r in rows if r["iterations_per_call"] < 50})
        if few:
            lines += ["", "Each timed call ends with a log line (by default every 50 steps) and "
                      "the finiteness check of the weights that precedes a checkpoint (every "
                      f"1000): the cases of {' or '.join(map(str, few))} iterations per call pay "
                      "them more often than training does, against the Trainer."]
        for r in rows:
            if "data" in r:
                lines += ["", f"The case {r['case']} trains on {r['data']}."]
        checkpoints = {r["case"]: r for r in rows}  # one per network
        if checkpoints:
            lines += ["", "A checkpoint took " + ", ".join(
                f"{r['checkpoint_seconds']:.3g} s ({case})" for case, r in checkpoints.items())
                + f", amortized over {rows[0]['checkpoint_every']} iterations."]
        lines.append("")
    if "profile" in sec:
        lines += _profile_markdown(sec["profile"])
    if "pyro" in sec:
        rows = sec["pyro"]
        lines += ["## The Pyro engine against torch", "",
                  f"One training iteration at T = {rows[0]['T']}, batch {rows[0]['batch']}, the "
                  "MLP on the 2D toy; both sides through `Trainer`. Target: ≤ "
                  f"{TARGETS['pyro']}x.", "",
                  "| estimator | Pyro (s/it) | torch (s/it) | ratio | target |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['seconds']:.3g} | {r['baseline_seconds']:.3g} | "
                  f"{_ratio(r)} | "
                  f"{_met(r)} |" for r in rows]
        lines += [""] + [f"Why vlb is slower: {r['why']}" for r in rows
                         if "why" in r and not r["met"]]
        lines.append("")
    if "growth" in sec:
        g = sec["growth"]
        lines += ["## How the full bound's cost grows", "",
                  "The MLP on D-dimensional data, time per (example, step) pair and the ratio to "
                  "the bare network at each point.", ""]
        for key, fixed in (("T", f"N = {g['T'][0]['N']}, D = 2"),
                           ("N", f"T = {g['N'][0]['T']}, D = 2"),
                           ("D", f"N = {g['D'][0]['N']}, T = {g['D'][0]['T']}")):
            lines += [f"With {key} ({fixed}):", "",
                      f"| {key} | pairs | full bound (s) | µs per pair | bare network (s) | "
                      "ratio |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r[key] if key != 'D' else r['dims']} | {r['pairs']} | "
                      f"{r['seconds']:.3g} | "
                      f"{r['us_per_pair']:.3g} | {r['baseline_seconds']:.3g} | {_ratio(r)} |"
                      for r in g[key]]
            lines.append("")
        if report.get("figure"):
            lines += [f"![growth]({report['figure']})", ""]
        lines += ["Reading the curves: the cost per pair is flat in T and N (no per-t or "
                  "per-example work beyond the batched chunks); the ratio is higher for small "
                  "chunks (T = 100, N = 1: fixed per-call costs) and grows with D because the "
                  "bound's own arithmetic (x_t, the mean and variance from the network's output, "
                  "the posterior mean, the KL and the decoder term: about 38 elementwise passes "
                  "over every (pair, dimension), counted with a dispatch-mode hook) scales with D "
                  "while this MLP of width 128 costs nearly the same at D = 2 and D = 64. With a "
                  "network that dominates, such as the U-Net above (also D = 64), the bound "
                  "costs what the network does.", ""]
    if "cuda" in sec:
        c = sec["cuda"]
        lines += ["## GPU", ""]
        if "skipped" in c:
            lines += [f"Skipped: {c['skipped']}.", ""]
        else:
            lines += [f"{c['gpu']}, measured {c.get('date', report['date'])}: the MNIST-sized "
                      f"U-Net (`unet_for(28, 1)`, learned variance), hybrid objective, batch "
                      f"{c['batch']}; full bound of {c['examples']} examples at T = {c['T']}.", "",
                      "| mode | training images/s | speed-up | full bound (s) | speed-up |",
                      "|---|---|---|---|---|"]
            eager, fast = c["modes"].get("eager_fp32", {}), c["modes"].get("bf16_compile", {})
            for mode, r in c["modes"].items():
                if "error" in r:
                    lines.append(f"| {mode} | failed: {r['error']} | | | |")
                    continue
                up = ((f"{r['images_per_s'] / eager['images_per_s']:.2f}x",
                       f"{eager['full_bound_seconds'] / r['full_bound_seconds']:.2f}x")
                      if "images_per_s" in eager else ("", ""))
                lines.append(f"| {mode} | {r['images_per_s']:.1f} | {up[0]} | "
                             f"{r['full_bound_seconds']:.3g} | {up[1]} |")
            if "images_per_s" in eager and "images_per_s" in fast:
                lines += ["", f"bf16 + compile against eager fp32: training "
                          f"{fast['images_per_s'] / eager['images_per_s']:.2f}x the images/s, full "
                          f"bound {eager['full_bound_seconds'] / fast['full_bound_seconds']:.2f}x "
                          "as fast (the aim: at least 2x)."]
            lines.append("")
    missed = [r for name in ("full_bound", "training") for r in sec.get(name, []) if not r["met"]]
    if missed:
        lines += ["## Targets not met in this run", ""]
        lines += [_missed(r) for r in missed]
        lines.append("")
    return "\n".join(lines)


def growth_figure(growth: dict, path: Path) -> None:
    """Seconds against T, N and D, on log-log axes, full bound and bare network."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    for ax, key in zip(fig.subplots(1, 3), ("T", "N", "D")):
        rows = growth[key]
        xs = [r[key] if key != "D" else r["dims"] for r in rows]
        ax.loglog(xs, [r["seconds"] for r in rows], "o-", label="full bound")
        ax.loglog(xs, [r["baseline_seconds"] for r in rows], "s--", label="bare network")
        ax.set_xlabel(key)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), make_parents=True)


# -- the command ----------------------------------------------------------------------------------

def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"valid: {', '.join(SECTIONS)}")
    return names


def _setting(item: str) -> tuple[str, int | tuple[int, ...]]:
    """``NAME=VALUE`` for one of the ``Settings``: an integer, or comma-separated integers for the
    tuple-valued ones."""
    name, eq, value = item.partition("=")
    fields = Settings.__dataclass_fields__
    if not eq or name not in fields:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=VALUE with NAME one of "
                                         + ", ".join(fields))
    many = isinstance(getattr(Settings(), name), tuple)
    try:
        parsed = tuple(int(v) for v in value.split(",")) if many else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{item!r}: {name} takes {'comma-separated integers' if many else 'an integer'}, got "
            f"{value!r}") from None
    if min(parsed if many else (parsed,)) < 1:  # an empty tuple cannot get here: int('') fails
        raise argparse.ArgumentTypeError(f"{item!r}: {name} must be >= 1 (every setting counts "
                                         "something)")
    return name, parsed


def _device(text: str) -> torch.device:
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads takes an integer >= 1, got {text!r}")
    return value


def _mnist_dir(text: str) -> str:
    if not _has_idx_files(Path(text)):
        raise argparse.ArgumentTypeError(f"--mnist-dir {text!r} does not hold the four MNIST IDX "
                                         f"files ({', '.join(IDX_FILES)}, plain or .gz)")
    return text


def _report(path: str) -> dict:
    """Another run's JSON report (for ``--include-json``), read before anything is measured."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path!r} as a pdiff bench report: "
                                         f"{e}") from None
    if not (isinstance(report, dict) and isinstance(report.get("sections"), dict)
            and "date" in report):
        raise argparse.ArgumentTypeError(f"{path!r} is not a pdiff bench report (no sections and "
                                         "date; `pdiff bench --out-json` writes one)")
    return report


def parser(prog: str = "python -m pdiff.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--out-json", default="docs/benchmarks.json", help="where the figures go (JSON)")
    p.add_argument("--out-md", default="docs/benchmarks.md", help="the report (Markdown)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for the smoke test")
    p.add_argument("--device", type=_device, default=torch.device("cpu"),
                   help="device of the CPU sections (default cpu)")
    p.add_argument("--only", type=_sections, default=SECTIONS,
                   help=f"comma-separated sections to run: {', '.join(SECTIONS)}")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="override one of the settings (see bench.Settings), e.g. repeats=11")
    p.add_argument("--include-json", type=_report, default=None,
                   help="merge the sections of another run's JSON that this run skips (a GPU "
                        "machine's cuda section, say)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch threads (default: OMP_NUM_THREADS if set, else the cores this "
                        "process may use)")
    p.add_argument("--mnist-dir", type=_mnist_dir, default=None,
                   help="folder of the MNIST IDX files for the MNIST U-Net's cases (default: "
                        f"{', '.join(MNIST_DIRS)} if it holds them, else random images of their "
                        "shape)")
    return p


def run(args: argparse.Namespace, command: str) -> dict:
    s = replace(QUICK if args.quick else Settings(), **dict(args.set))
    device = args.device
    report = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc)
              .strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "settings": asdict(s),
              "sections": {}}
    sec = report["sections"]
    with tempfile.TemporaryDirectory(prefix="pdiff-bench-") as tmp:
        root = Path(tmp)
        for name in args.only:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            if name == "full_bound":
                sec[name] = bench_full_bound(s, device)
            elif name == "training":
                sec[name] = bench_training(s, device, root, args.mnist_dir)
            elif name == "profile":
                sec[name] = bench_profile(s, device, root, args.mnist_dir)
            elif name == "pyro":
                sec[name] = bench_pyro(s, device, root)
            elif name == "growth":
                sec[name] = bench_growth(s, device)
            else:
                sec[name] = {**bench_cuda(s), "date": report["date"]}
    if args.include_json:
        include(report, args.include_json)
    report["load_average_end"] = list(os.getloadavg())
    return report


def include(report: dict, other: dict) -> None:
    """Merge into ``report`` the sections of ``other`` that it lacks or skipped, and record in
    ``report["included"]`` when each was measured: the date ``other`` recorded for it (it may have
    merged it from an earlier report in turn), else ``other``'s own date."""
    sec, included = report["sections"], report.setdefault("included", {})
    for name, value in other["sections"].items():
        if name in sec and "skipped" not in sec[name]:
            continue
        date = (other.get("included", {}).get(name)
                or (value.get("date") if isinstance(value, dict) else None) or other["date"])
        sec[name] = {**value, "date": date} if isinstance(value, dict) else value
        included[name] = date


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (its missing folders are created), or None."""
    if path.is_dir():
        return f"{path} is a directory; expected a file name"
    return unwritable(path)


def main(argv: list[str] | None = None, prog: str = "python -m pdiff.bench") -> int:
    """The command line (``pdiff bench`` passes ``prog="pdiff bench"``); returns the exit code:
    2 for outputs that cannot be written (checked before anything is measured), 1 when writing
    fails (a full disk)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tune_allocator()  # as the command line does, for both sides of every ratio
    args = parser(prog).parse_args(argv)
    md_path, json_path = Path(args.out_md), Path(args.out_json)
    figure = md_path.parent / "figures" / "benchmarks" / "growth.png"
    outputs = [json_path, md_path] + ([figure] if "growth" in args.only else [])
    problem = ("--out-json and --out-md name the same file" if json_path.resolve() == md_path.resolve()
               else next(filter(None, map(_unwritable, outputs)), None))
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    set_threads(args.threads)  # restored below: a test calling main() keeps its own setting
    print(f"[bench] {threads_note()}", file=sys.stderr, flush=True)
    try:
        report = run(args, prog + "".join(" " + shlex.quote(a) for a in argv))
    finally:
        torch.set_num_threads(threads_before)
    writes = []
    if "growth" in report["sections"]:
        report["figure"] = os.path.relpath(figure, md_path.parent)
        writes.append((figure, lambda: growth_figure(report["sections"]["growth"], figure)))
    writes += [(json_path, lambda: atomic_write_text(json.dumps(report, indent=2) + "\n", json_path,
                                                     make_parents=True)),
               (md_path, lambda: atomic_write_text(markdown(report), md_path, make_parents=True))]
    for k, (path, write) in enumerate(writes):
        try:
            write()
        except OSError as e:  # each write is atomic: the file is the old one, or none
            done = ", ".join(str(p) for p, _ in writes[:k])
            print(f"{prog}: error: could not write {path}: {e.strerror or e}"
                  + (f" (written: {done})" if done else ""), file=sys.stderr)
            return 1
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
