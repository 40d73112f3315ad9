"""Data parallelism for runs launched by ``torchrun``: a thin layer over ``torch.distributed``.

``torchrun`` starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``.
``init`` joins the process group (gloo on the CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``);
every other function works on the group once it is initialized and is a no-op (or the identity)
in a single process, so callers never branch on how they were launched.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

R = TypeVar("R")
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(name in os.environ for name in _ENV)


def active() -> bool:
    """Whether a process group is initialized (``init`` was called under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def init(device: str | torch.device = "cpu") -> torch.device:
    """Join the ``torchrun`` process group if launched by it (idempotent); return this rank's device.

    ``device`` ``cuda`` (or ``cuda:N``) becomes ``cuda:LOCAL_RANK`` under ``torchrun``, one device
    per process. Outside ``torchrun`` nothing is initialized and ``device`` is returned as given.
    """
    device = torch.device(device)
    if not launched():
        return device
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                             "start at most one process per device (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def cleanup() -> None:
    """Leave the process group (at the end of a command); a no-op if none was joined."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def rank_seed(seed: int, r: int | None = None) -> int:
    """The seed of rank ``r``'s random stream: ``seed`` itself on rank 0 (so a one-process run is
    unchanged), a distinct stream for every other (seed, rank) pair."""
    r = rank() if r is None else r
    return seed if r == 0 else (seed * 1_000_003 + r * 7_919 + 104_729) % 2**63


def _collective_device(x: torch.Tensor) -> torch.device:
    # NCCL works on CUDA tensors only; gloo on CPU tensors (and CUDA ones, copied)
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def all_gather_cat(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dimension 0 in rank order (``x`` itself in one process).

    Rank r's ``x`` has ``sizes[r]`` rows (all the same size when ``sizes`` is None) and the same
    trailing shape and dtype on every rank; unequal sizes are padded for the collective and trimmed.
    """
    if not active() or world_size() == 1:
        return x
    W = world_size()
    sizes = [x.shape[0]] * W if sizes is None else list(sizes)
    if len(sizes) != W or sizes[rank()] != x.shape[0]:
        raise ValueError(f"rank {rank()} has {x.shape[0]} rows but sizes says {sizes}")
    rows = max(sizes)
    device = _collective_device(x)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The elementwise ``sum``, ``mean``, ``min`` or ``max`` of ``x`` over ranks (a new tensor)."""
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
           "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(ops)}")
    if not active() or world_size() == 1:
        return x.clone()
    y = x.detach().to(_collective_device(x), copy=True)
    dist.all_reduce(y, ops[op])
    if op == "mean":
        y = y / world_size()
    return y.to(x.device)


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not active() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj) -> list | None:
    """Every rank's picklable ``obj`` in rank order on rank 0, None on the others."""
    if not active() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn: Callable[[], R]) -> R:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception there is raised
    on every rank (as the same exception type where it can be pickled, marked ``on_every_rank``), so
    no rank waits forever for a rank that gave up."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # handed to every rank below
            if not active():
                raise
            error = e
    if not active():
        return result
    result, error = broadcast_object((result, _portable(error)))
    if error is not None:
        error.on_every_rank = True  # so rank 0 alone reports it
        raise error
    return result


def _portable(error: Exception | None) -> Exception | None:
    import pickle

    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
