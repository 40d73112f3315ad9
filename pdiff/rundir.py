"""The run directory a trainer writes: checked before anything is written, locked while a process
trains in it, and replaced under ``--force`` only once the new run is known to work.

- ``RunDirectory(out, resume=..., force=...)`` only reads: it refuses a file where a directory is
  asked for, a non-empty directory without ``resume``/``force``, an unwritable place, and (under
  ``force``) a directory holding files that are not a run's.
- ``lock()`` takes an exclusive ``flock`` on ``OUT/.pdiff.lock`` (the holder's pid written inside):
  a second trainer in the same directory is refused in one line; the kernel drops the lock when
  the process dies, so a killed run leaves no stale lock.
- Under ``force`` a new run is written into a hidden staging directory beside ``OUT``; ``commit()``
  swaps the two at the new run's first checkpoint (``renameat2(RENAME_EXCHANGE)``: atomic) and
  deletes the old run. Until then the old run is untouched; a kill leaves it as it was, and the
  staging directory is removed by the next ``--force`` into ``OUT``.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

from .files import unwritable

LOCK = ".pdiff.lock"
STAGING = ".{name}.pdiff-new-{pid}"
# the files a run directory may hold: the trainer's, compare's record and samples, temporaries
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl", LOCK, "eval.json", "samples.pt")


class RunInUse(ValueError):
    """Another live process holds the run directory's lock."""


def _is_run_file(p: Path) -> bool:
    return p.name in RUN_FILES or (p.name.endswith(".tmp") and p.name.split(".")[0] in
                                   ("config", "checkpoint", "metrics", "eval", "samples"))


class RunDirectory:
    """Where a run's files go (``path``: ``out`` itself, or the staging directory under force)."""

    def __init__(self, out: str | Path, *, resume: bool = False, force: bool = False):
        self.out = Path(out)
        self.path = self.out
        self._locks: list[int] = []
        self._out_lock: int | None = None
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} is a file, not a directory")
        entries = [p for p in self.out.iterdir() if p.name != LOCK] if self.out.is_dir() else []
        if entries and not (resume or force):
            raise ValueError(f"run directory {str(self.out)!r} exists and is not empty; pass "
                             "--resume to continue it or --force to overwrite it")
        self.has_checkpoint = (self.out / "checkpoint.pt").is_file()
        self.resume = resume and self.has_checkpoint
        if resume and entries and not self.has_checkpoint and not force:
            raise ValueError(f"no checkpoint.pt in {str(self.out)!r} to resume from (the run was "
                             "stopped before its first checkpoint, or the file was removed); pass "
                             "--force to start the run over")
        self.replacing = bool(entries) and force and not self.resume
        if self.replacing:
            foreign = sorted(p.name for p in entries if not _is_run_file(p))
            if foreign:
                raise ValueError(f"--force replaces a run directory, and {str(self.out)!r} holds "
                                 f"files that are not a pdiff run's ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); choose another --out")
        _check_writable(self.out)
        if entries:  # a run is there: no other process may train in it from now on
            self.lock()

    def read_config(self) -> dict:
        """The saved ``config.json`` of the run being resumed; ``ValueError`` naming the file and
        the problem if it is missing or damaged."""
        path = self.out / "config.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} is missing: the run cannot be checked against the options "
                             "given; pass --force to start the run over") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path} is damaged ({e}); pass --force to start the run over") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{path} is damaged (a JSON {type(saved).__name__}, not an object); "
                             "pass --force to start the run over")
        return saved

    def lock(self) -> None:
        """Lock ``out`` (if it exists) for this process, once; ``RunInUse`` if another process
        holds it."""
        if self._out_lock is None and self.out.is_dir():
            self._out_lock = _take_lock(self.out)
            self._locks.append(self._out_lock)

    def open(self) -> Path:
        """Create the directory the new files go to, locked, and return it: ``out`` itself, or a
        fresh staging directory beside it when replacing a run. The first write of a run."""
        if self.replacing:
            for old in self.out.parent.glob(STAGING.format(name=self.out.name, pid="*")):
                _remove_if_unlocked(old)  # a killed --force left it
            self.path = self.out.parent / STAGING.format(name=self.out.name, pid=os.getpid())
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.replacing:
            self._locks.append(_take_lock(self.path))
        else:
            self.lock()
        for tmp in self.path.glob("*.tmp"):  # a kill during a write left it (we hold the lock)
            tmp.unlink(missing_ok=True)
        return self.path

    @property
    def staged(self) -> bool:
        return self.path != self.out

    def commit(self) -> Path:
        """Put the staged run in place of the old one (at its first checkpoint); returns ``out``."""
        if not self.staged:
            return self.out
        old = self.path  # after the exchange, the staging name holds the old run
        _exchange(self.path, self.out)
        self.path = self.out
        shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abandon(self) -> None:
        """Remove a staged run that never reached a checkpoint (the old run stays as it was)."""
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = self.out

    def release(self) -> None:
        for fd in self._locks:
            _drop_lock(fd)
        self._locks.clear()
        self._out_lock = None

    def __del__(self):
        self.abandon()
        self.release()


def _check_writable(out: Path) -> None:
    """``out`` (or the nearest existing folder above it, where it would be created) is writable."""
    reason = unwritable(out / LOCK) if out.is_dir() else unwritable(out)
    if reason:
        raise ValueError(f"run directory {str(out)!r}: {reason}")


def _take_lock(folder: Path) -> int:
    """An open descriptor of ``folder``'s lock file, exclusively locked; ``RunInUse`` if another
    process holds it. The file is removed on release (``_drop_lock``), so a lock taken on a file
    that has just been removed is let go and taken again on the new one."""
    import fcntl

    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunInUse(f"run directory {str(folder)!r} is in use by process {holder} (a "
                               "pdiff train running in it); wait for it to finish or stop it "
                               "first") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _drop_lock(fd: int) -> None:
    """Remove the lock file this descriptor holds (if it is still that file), then let go."""
    try:
        target = Path(f"/proc/self/fd/{fd}").readlink()
        if os.stat(target).st_ino == os.fstat(fd).st_ino:
            os.unlink(target)
    except OSError:
        pass  # no /proc, or the folder is gone: the lock is let go all the same
    os.close(fd)


def _remove_if_unlocked(folder: Path) -> None:
    try:
        fd = _take_lock(folder)
    except (RunInUse, OSError):
        return  # its process is still running (or it is not ours to touch)
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        _drop_lock(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap the directories ``a`` and ``b`` atomically (Linux ``renameat2``), else by two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))
    aside = a.with_name(a.name + ".old")  # a file system without exchange: a moment with no b
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)
