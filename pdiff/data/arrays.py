"""Arrays a user gives in a file: points (one example a row) and beta schedules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARRAY_SUFFIXES = (".npy", ".csv", ".txt")


def load_array(path: str | Path) -> torch.Tensor:
    """A float64 (N, D) array from a .npy file or a whitespace/comma-separated text file, one
    example a row (a 1-D array is one column); ``ValueError`` naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            arr = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except (ValueError, OSError) as e:
        raise ValueError(f"could not read {str(path)!r} (.npy or numeric text expected): {e}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{str(path)!r} holds {arr.dtype} values, expected numbers")
    return torch.as_tensor(arr, dtype=torch.float64)


def load_betas(path: str | Path) -> torch.Tensor:
    """beta_1..beta_T from a file: one row or one column (a 1-D .npy array is one column)."""
    b = load_array(path)
    if b.dim() != 2 or 1 not in b.shape:
        raise ValueError(f"--betas {str(path)!r}: expected beta_1..beta_T as one row or one column, "
                         f"got shape {tuple(b.shape)}")
    return b.flatten()
