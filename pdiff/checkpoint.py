"""Checkpoint files: written whole with a checksum of their contents, read back verified.

``torch.save`` writes a zip archive; a flipped byte inside a tensor's data leaves an archive that
loads without complaint, with different weights. ``save_checkpoint`` stores a SHA-256 of every
tensor and value in the state (``checksum``); ``read_checkpoint`` recomputes it, so silent
corruption is reported as corruption, and it refuses a state missing the keys a run needs or whose
weights are not finite. Every failure is a ``CheckpointError`` (a ``ValueError``) naming the file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .files import atomic_save

# what a checkpoint must hold to be loaded (resume needs the optimizer, sampler and RNG state too)
REQUIRED_KEYS = ("net", "ema", "step", "config", "rescale_shift", "rescale_scale")
RESUME_KEYS = REQUIRED_KEYS + ("opt", "sampler", "generator", "torch_rng")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def checksum(state) -> str:
    """SHA-256 over ``state`` in a fixed traversal: dict keys sorted, each tensor's dtype, shape
    and bytes, every other value's ``repr``."""
    h = hashlib.sha256()

    def visit(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"{")
            for k in sorted(obj, key=repr):
                h.update(repr(k).encode())
                visit(obj[k])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for v in obj:
                visit(v)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` with its ``checksum`` atomically (synced before the rename)."""
    atomic_save(state | {"checksum": checksum(state)}, path)


def read_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                    keys: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """The state in ``path``, verified: readable, holding ``keys``, its checksum matching (older
    checkpoints without one are accepted), its weights finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a pdiff checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a pdiff checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a complete pdiff "
                              "checkpoint (damaged, or written by another program)")
    stored = state.pop("checksum", None)
    if stored is not None and checksum(state) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the "
                              "checksum stored when it was written")
    for name in ("net", "ema"):
        bad = [k for k, v in state[name].items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"checkpoint {path} holds non-finite {name} weights ({bad[0]}"
                                  + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                                  + "): it cannot be evaluated or resumed")
    return state


def size_mismatch(module: torch.nn.Module, state_dict: dict) -> str | None:
    """One line saying how ``state_dict``'s tensors differ in name or shape from ``module``'s, or
    None if they match."""
    mine = module.state_dict()
    missing = [k for k in mine if k not in state_dict]
    extra = [k for k in state_dict if k not in mine]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in mine.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if shapes:
        k, saved, here = shapes[0]
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        return f"{k} is {saved} in the checkpoint and {here} in this network{more}"
    if missing or extra:
        return (f"the checkpoint's network has {len(extra)} tensor(s) this one lacks"
                + (f" ({extra[0]}, ...)" if extra else "")
                + f" and lacks {len(missing)} of this one's" + (f" ({missing[0]}, ...)" if missing else ""))
    return None
