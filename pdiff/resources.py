"""What a command needs from the machine, checked before it starts: memory.

A size too large to allocate (a batch, T, a training split, a number of samples) is refused up
front with the figure, in one line, instead of a traceback (or the kernel's OOM killer) after
minutes of work. The estimate is the command's own: the bytes of the tensors it will hold at once.
"""
from __future__ import annotations

import os

GiB = 1 << 30


def available_memory() -> int:
    """Bytes the system can give this process now without swapping: ``MemAvailable`` from
    /proc/meminfo on Linux, else physical memory, else a large number (no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def require_memory(nbytes: float, what: str, *, hint: str = "", available: int | None = None) -> None:
    """``ValueError`` (one line: what, the bytes needed, the bytes available, ``hint``) if
    ``nbytes`` exceeds the memory available now (``available``, default ``available_memory()``)."""
    have = available_memory() if available is None else available
    if nbytes > have:
        raise ValueError(f"{what} needs about {format_bytes(nbytes)} of memory and "
                         f"{format_bytes(have)} is available" + (f"; {hint}" if hint else ""))
