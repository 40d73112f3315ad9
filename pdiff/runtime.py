"""Process-wide settings the command line applies before any work: the memory allocator and the
number of torch threads.

Threads: torch starts as many intra-op threads as OpenMP sees processors, which on a machine whose
cores are shared out (an affinity mask from ``taskset`` or a batch scheduler, a container's CPU
quota) can be more than the process may use; threads beyond its cores only wait for each other.
``set_threads`` sets ``torch.set_num_threads`` to the cores this process may use
(``available_cores``), unless ``OMP_NUM_THREADS`` or the caller says otherwise, and
``threads_note`` says which, for the command line to print.

On Linux, glibc's ``malloc`` serves blocks above a threshold (128 KiB at first, adapting up to
32 MiB) with ``mmap`` and gives them back to the kernel on ``free``; PyTorch on the CPU allocates
and frees activations of that size for every network call, so each call pays page faults to get
fresh zeroed pages. ``pdiff evaluate`` of a digits U-Net (default sample metric, one thread)
spent 9 of its 122 s in the kernel that way, 2 s with this setting, 5% less wall time.
``tune_allocator`` raises both thresholds (``mallopt``), so freed blocks stay in the process and
are reused, as jemalloc or tcmalloc would. The price: memory freed by the process is returned to
the system only in blocks above ``trim_bytes``.

It changes nothing where the user tuned glibc already (any ``MALLOC_*`` environment variable),
where ``PDIFF_NO_MALLOPT`` is set, or off glibc. It is the command line's choice, not the
library's: importing ``pdiff`` leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3

_tuned = False


def tune_allocator(mmap_bytes: int = 1 << 30, trim_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks up to ``mmap_bytes`` in the process; returns whether it did (also when
    an earlier call did)."""
    global _tuned
    if _tuned:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get("PDIFF_NO_MALLOPT")
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # glibc caps the mmap threshold (32 MiB on 64-bit builds before 2.26); try the wish, then that
    ok = any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in (mmap_bytes, 32 << 20))
    _tuned = ok and mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
    return _tuned


def allocator_tuned() -> bool:
    """Whether ``tune_allocator`` changed this process's allocator (worker pools copy the choice)."""
    return _tuned


# the CPU quota of this process's cgroup as the container sees it (v2, then v1); tests point
# these elsewhere
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")

_threads: tuple[int, int, str] | None = None  # set_threads' choice: (threads, cores, why)


def _cpu_quota() -> float | None:
    """The cgroup's CPU quota in cores (1.5: 150 ms of CPU per 100 ms), or None without one."""
    try:
        if CGROUP_CPU_MAX.is_file():
            quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        else:
            quota, period = CGROUP_V1_QUOTA.read_text(), CGROUP_V1_PERIOD.read_text()
        quota, period = quota.strip(), int(period)
        if quota == "max" or int(quota) <= 0 or period <= 0:  # v1 writes -1 for none
            return None
        return int(quota) / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask (``os.sched_getaffinity``) where the
    platform has one, else ``os.cpu_count()``; at most its cgroup's CPU quota, rounded up."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    quota = _cpu_quota()
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a thread count (the first of a nested list such as ``4,2``), or
    None if it is unset or not a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads and return how many: ``requested`` if given, else
    ``OMP_NUM_THREADS`` if set to a positive integer, else ``available_cores()``."""
    cores = available_cores()
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an integer >= 1, got {requested!r}")
        threads, why = requested, "as requested"
    elif (omp := _omp_threads()) is not None:
        threads, why = omp, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        threads, why = cores, ""
    torch.set_num_threads(threads)
    global _threads
    _threads = (threads, cores, why)
    return threads


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None


def threads_note() -> str:
    """One line on the threads torch uses and why, e.g. ``using 2 threads (of 2 cores
    available)``; before ``set_threads`` it reports torch's own choice. Call it before the work
    starts: with more than one thread, a load average that leaves fewer idle cores than threads
    is pointed out (other jobs hold the cores, and OpenMP's threads spin waiting for each other:
    on a 2-core machine with a load average of 4, one thread trained the MNIST U-Net 1.5 times
    as fast as two, and a U-Net of half its width 3.7 times)."""
    threads, cores = torch.get_num_threads(), available_cores()
    why = _threads[2] if _threads and _threads[0] == threads else (
        "set elsewhere" if _threads else "torch's default")
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    where = f"of {plural(cores, 'core')} available"
    note = f"using {plural(threads, 'thread')} ({why + '; ' if why else ''}{where})"
    load = _load_average()
    if threads > 1 and load is not None and cores - load < min(threads, cores) - 0.5:
        note += (f"; the load average is {load:.1f}: other jobs are using the cores, and fewer "
                 "threads may be faster (OMP_NUM_THREADS=1)")
    return note
