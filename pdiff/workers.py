"""Worker processes that go with the command that started them.

``pdiff compare --jobs N`` trains in a pool of spawned processes. They must not outlive it:

- killed outright (SIGKILL, no cleanup runs), the command takes its workers with it: each sets the
  kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, Linux) or, elsewhere, polls its
  parent's pid from a thread;
- Ctrl-C reaches the whole process group: workers ignore SIGINT (held from their spawn until their
  initializer, ``sigint_held``), and the parent ends them (``stop_pool``), so the command prints one
  line, not a traceback per worker;
- SIGTERM (``stop_pool``'s) ends a worker through its cleanup (``finally`` blocks, exit handlers).
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Callable

from .runtime import tune_allocator

PR_SET_PDEATHSIG = 1  # linux/prctl.h

_terminated = False  # this worker was sent SIGTERM


def worker_pool(jobs: int, *, tune: bool = False) -> ProcessPoolExecutor:
    """``jobs`` spawned workers that die with this process (``tune``: the allocator as here)."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                               initializer=_init, initargs=(tune, os.getpid()))


def _init(tune: bool, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C is dropped
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent(parent)
    if tune:
        tune_allocator()


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` dies. The parent-death signal fires when the parent's
    *thread* that spawned this process exits: the one calling ``pool.submit``, which then waits
    for the pool's work. A parent gone before the signal was set is caught by the pid check."""
    try:
        linux = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError, TypeError):  # no prctl (macOS)
        linux = False
    if os.getppid() != parent:
        os._exit(1)
    if not linux:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(1)
    os._exit(1)


def _on_sigterm(signum, frame) -> None:
    """``SystemExit`` rather than sudden death: a run's ``finally`` blocks (its lock, a staged
    directory) and the exit handlers run, and multiprocessing's resource tracker has no leaked
    semaphore (tqdm's lock) to warn about."""
    global _terminated
    _terminated = True
    raise SystemExit(128 + signum)


def in_worker(fn: Callable, *args, **kw):
    """``fn(*args, **kw)`` in a pool worker. Once SIGTERM came, work still queued for the worker
    ends before it starts; the ``SystemExit`` comes back as an error, which the parent records
    as that task's failure (``fut.result()`` would otherwise exit the parent)."""
    try:
        if _terminated:
            raise SystemExit
        return fn(*args, **kw)
    except SystemExit:
        raise RuntimeError("the worker was stopped (SIGTERM)") from None


@contextmanager
def sigint_held():
    """SIGINT blocked in this thread while it spawns workers: they inherit the mask, so a Ctrl-C
    while they import torch (before their initializer) is not a traceback in each. This process
    takes the signal when it is released (or at once in another of its threads)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the tasks not started and end the running ones now (not after they finish, as the
    pool's own shutdown would)."""
    workers = list((pool._processes or {}).values())  # no public way to end a running task
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        p.terminate()
    for p in workers:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
