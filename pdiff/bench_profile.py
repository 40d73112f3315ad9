r"""Where a training step's time goes: ``Trainer`` iterations under ``torch.profiler``, by part.

    python -m pdiff.bench_profile --data mnist --data-dir ../shared/data/mnist --threads 1

Every op the profiler records is charged its self time to one component. The network's modules
are marked with ``record_function`` scopes while they run (the innermost scope wins: a GroupNorm
inside an attention block counts as GroupNorm, the attention block's 1x1 convolutions and
``scaled_dot_product_attention`` as attention); a backward op is charged to the component of the
forward op that recorded its autograd node (matched by sequence number). Components:

  convolution    the 3x3 convolutions (and the 1x1 skip convolutions), forward and backward
  attention      the attention blocks: qkv and output projections, the attention itself
  groupnorm      every GroupNorm
  silu           every SiLU
  embedding      the time embedding (sinusoid, two linear layers) and its per-block projections
  network other  the rest of the network: skip concatenations, residual additions, upsampling
  loss           the objective's arithmetic around the network: t, eps and x_t, the mean and
                 variance from the output, the KL and decoder terms, and their backward
  data           drawing the batch's indices and gathering its images
  optimizer      zero_grad, storing the gradients (autograd's AccumulateGrad) and AdamW's step
  clip           gradient clipping
  ema            the EMA update
  trainer other  the rest of ``Trainer.train``'s ops (the running loss sum, the finiteness checks)

The step's wall time less the recorded ops is Python between ops and the profiler's own cost
(``unrecorded``). Module scopes are found by class (``torch.nn`` layers, the U-Net's attention
block) and, for the embeddings, by the U-Net's attribute names: the split is the U-Net's; an MLP
denoiser's layers count as "network other".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function

from .nets.unet import AttentionBlock
from .runtime import set_threads, threads_note, tune_allocator
from .train import TrainConfig, Trainer

COMPONENTS = ("convolution", "attention", "groupnorm", "silu", "embedding", "network other",
              "loss", "data", "optimizer", "clip", "ema", "trainer other")
SCOPE = "pdiff::"
# module class -> component (the attention block's 1x1 projections are its Conv1d)
MODULE_COMPONENTS = ((nn.GroupNorm, "groupnorm"), (nn.SiLU, "silu"), (nn.Conv1d, "attention"),
                     (AttentionBlock, "attention"), (nn.Conv2d, "convolution"))
# the U-Net's embedding modules, by attribute name (UNet and ResBlock)
EMBEDDING_NAMES = ("sinusoidal", "time_embed", "label_embed", "emb_layers")
TORCH_SCOPES = {"Optimizer.step": "optimizer", "Optimizer.zero_grad": "optimizer"}


def _component_of(name: str, module: nn.Module) -> str | None:
    if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
        return "embedding"
    return next((c for cls, c in MODULE_COMPONENTS if isinstance(module, cls)), None)


@contextlib.contextmanager
def marked(net: nn.Module):
    """Every module of ``net`` with a component runs inside a ``pdiff::<component>`` scope."""
    handles, stack = [], []

    def enter(name):
        def hook(module, args):
            scope = record_function(SCOPE + name)
            scope.__enter__()
            stack.append(scope)
        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for path, module in net.named_modules():
        name = "network other" if module is net else _component_of(path, module)
        if name is not None:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _scoped(fn, name: str):
    def run(*args, **kwargs):
        with record_function(SCOPE + name):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def instrumented(trainer: Trainer):
    """The trainer's batch, loss, EMA update and gradient clipping in scopes of their own."""
    originals = {name: getattr(trainer, name) for name in ("_batch", "_loss", "_update_ema")}
    clip = torch.nn.utils.clip_grad_norm_
    trainer._batch = _scoped(originals["_batch"], "data")
    trainer._loss = _scoped(originals["_loss"], "loss")
    trainer._update_ema = _scoped(originals["_update_ema"], "ema")
    torch.nn.utils.clip_grad_norm_ = _scoped(clip, "clip")
    try:
        with marked(trainer.net):
            yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        for name in originals:
            delattr(trainer, name)  # the class's methods again


def _scope_component(event) -> str | None:
    """The component of the innermost scope around ``event`` (itself included), or None."""
    while event is not None:
        name = event.name
        if name.startswith(SCOPE):
            return name[len(SCOPE):]
        for prefix, component in TORCH_SCOPES.items():
            if name.startswith(prefix):
                return component
        event = event.cpu_parent
    return None


def _backward_node(event):
    """The ``evaluate_function`` event of the autograd node ``event`` runs in, or None for an op
    outside the backward pass."""
    while event is not None:
        if event.name.startswith("autograd::engine::evaluate_function"):
            return event
        event = event.cpu_parent
    return None


def charge(events) -> list[str]:
    """The component each of the profiler's ``events`` is charged to."""
    nodes = [_backward_node(e) for e in events]
    # sequence number -> component of the latest-starting forward op that recorded it: the op that
    # made the autograd node, or one nested in it (earlier ops that made none share its number)
    forward: dict[int, tuple[float, str]] = {}
    for e, node in zip(events, nodes):
        if node is None and e.sequence_nr >= 0:
            if e.time_range.start >= forward.get(e.sequence_nr, (-1.0, ""))[0]:
                comp = _scope_component(e) or "trainer other"
                forward[e.sequence_nr] = (e.time_range.start, comp)
    out = []
    for e, node in zip(events, nodes):
        if node is not None and node.sequence_nr >= 0:  # a backward op: its forward op's component
            comp = forward.get(node.sequence_nr, (0.0, "trainer other"))[1]
        elif node is not None and node.name.endswith("AccumulateGrad"):  # no forward op
            comp = "optimizer"
        else:  # a forward op: the scope around it
            comp = _scope_component(e) or "trainer other"
        out.append(comp if comp in COMPONENTS else "trainer other")
    return out


def breakdown(events) -> dict[str, float]:
    """Self time (seconds) per component of the profiler's ``events``."""
    totals = dict.fromkeys(COMPONENTS, 0.0)
    for e, comp in zip(events, charge(events)):
        totals[comp] += e.self_cpu_time_total / 1e6
    return totals


def conv_macs(net: nn.Module, like: torch.Tensor) -> int:
    """Multiply-accumulates of ``net``'s 2D convolutions in one forward pass on ``like`` (one
    example, shape (1, C, H, W)); a training step does about three times as many per example
    (the forward pass, the input and the weight gradients)."""
    total = 0

    def count(module, args, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(like, torch.ones(like.shape[0], dtype=torch.long, device=like.device))
    finally:
        for h in handles:
            h.remove()
    return total


def profile_steps(trainer: Trainer, steps: int, warmup: int = 1) -> dict:
    """``steps`` iterations of ``trainer`` (after ``warmup``) under the profiler: seconds per step
    for each component, the wall time and what the profiler did not record."""
    from torch.profiler import ProfilerActivity, profile

    trainer.cfg.iterations = trainer.step + warmup
    trainer.train(progress=False)
    trainer.save = lambda: None  # a call's last step writes a checkpoint: not a step's cost
    with instrumented(trainer), profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.cfg.iterations = trainer.step + steps
        start = time.perf_counter()
        trainer.train(progress=False)
        wall = time.perf_counter() - start
    totals = {k: v / steps for k, v in breakdown(prof.events()).items()}
    recorded = sum(totals.values())
    return {"wall_seconds": wall / steps, "components": totals,
            "unrecorded": wall / steps - recorded}


def timed_steps(trainer: Trainer, steps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``steps`` plain iterations (no profiler, no checkpoints), after
    ``warmup``."""
    trainer.save = lambda: None
    trainer.cfg.iterations = trainer.step + warmup
    trainer.train(progress=False)
    times = []
    for _ in range(steps):
        trainer.cfg.iterations = trainer.step + 1
        start = time.perf_counter()
        trainer.train(progress=False)
        times.append(time.perf_counter() - start)
    return times


def table(result: dict) -> str:
    """The breakdown as a Markdown table: ms per step and share of the wall time."""
    wall, rows = result["wall_seconds"], ["| component | ms per step | share |", "|---|---|---|"]
    items = list(result["components"].items()) + [("unrecorded", result["unrecorded"])]
    rows += [f"| {name} | {1e3 * s:.1f} | {100 * s / wall:.1f}% |" for name, s in items]
    rows.append(f"| **step (wall)** | **{1e3 * wall:.1f}** | 100% |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdiff.bench_profile",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--objective", default="hybrid")
    p.add_argument("--batch-size", type=int, default=None, help="default: the data's")
    p.add_argument("--channels", type=int, default=0, help="U-Net base width (0: unet_for's)")
    p.add_argument("--threads", type=int, default=None, help="default: the cores available")
    p.add_argument("--steps", type=int, default=3, help="profiled iterations")
    p.add_argument("--timed", type=int, default=0, help="then this many unprofiled iterations")
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tune_allocator()
    set_threads(args.threads)
    changes = {"objective": args.objective, "channels": args.channels, "iterations": 1,
               "data_dir": args.data_dir, "image_size": args.image_size}
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    cfg = TrainConfig.for_data(args.data, **changes)
    with tempfile.TemporaryDirectory(prefix="pdiff-profile-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        result = profile_steps(trainer, args.steps)
        if args.timed:
            result["timed_seconds"] = timed_steps(trainer, args.timed, warmup=0)
            result["timed_median"] = statistics.median(result["timed_seconds"])
    result |= {"threads": threads_note(), "batch": cfg.batch_size, "objective": cfg.objective,
               "data": cfg.data, "event_shape": list(trainer.event_shape),
               "parameters": sum(p.numel() for p in trainer.net.parameters())}
    print(f"{cfg.data} {tuple(trainer.event_shape)}, batch {cfg.batch_size}, {cfg.objective}, "
          f"{result['parameters']} parameters; {result['threads']}")
    print(table(result))
    if args.timed:
        print(f"unprofiled: {1e3 * result['timed_median']:.1f} ms per step (median of "
              f"{args.timed}), {cfg.batch_size / result['timed_median']:.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
