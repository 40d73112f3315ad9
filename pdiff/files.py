"""Files written whole or not at all.

Each file is written to a temporary file beside its destination and renamed into place
(``os.replace``, atomic within one file system): a kill or an error leaves the old file, or none,
never half of a new one, and on an error the temporary file is removed. Checkpoints, run records,
reports, figures, sample arrays and downloaded data all go through ``atomic_write``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None], *, suffix: str = ".tmp",
                 fsync: bool = False, make_parents: bool = False) -> None:
    """``write(tmp)`` fills a temporary file beside ``path`` (its name ends in ``suffix``, for
    writers that go by the extension), which then replaces ``path``. ``fsync``: force the data to
    disk before the rename, so that a power cut cannot leave the new name on an empty file.
    ``make_parents``: create ``path``'s directory first if it is missing (outputs such as
    figures; a run's own files expect their directory to exist)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=suffix)
    try:  # mkstemp makes it 0600: give it the mode a plain open() would (the old file's, or umask)
        os.fchmod(fd, _mode_of(path))
    finally:
        os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_of(path: Path) -> int:
    """The permission bits a file written at ``path`` should have: those of the file it replaces,
    else 0666 less the process's umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # read without changing it (Linux 4.7+); os.umask can only be read by setting it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(text: str, path: str | Path, *, make_parents: bool = False) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                 make_parents=make_parents)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` of ``obj``, synced to disk before the rename (a checkpoint)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def unwritable(path: str | Path) -> str | None:
    """Why ``path`` (a file or folder still to be made, with any missing folders above it) cannot
    be created, or None: the nearest existing folder above it must be a writable folder."""
    path = Path(path)
    place = path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        return f"cannot write {path}: {place} is not a folder"
    if not os.access(place, os.W_OK | os.X_OK):
        return f"cannot write {path}: folder {place} is not writable"
    return None

