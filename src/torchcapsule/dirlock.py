"""One writer per directory: an fcntl lock on <dir>/.lock, held for the life of the holding process.

The kernel releases the lock when the holder dies, however it dies, so a lock is never stale.
The lock file's text names the holder (e.g. a job id), which is what a refused second run shows.
POSIX (fcntl) locks work on NFS too, but belong to the process and are dropped when ANY of its
descriptors of the file is closed: a process therefore opens a lock file at most once, here.
Light on purpose (no torch): the launcher takes the same lock the training runtime checks.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Mapping

from .errors import CheckpointBusy

LOCK_FILE = ".lock"
_FLOCK = "hh4xqqi4x"
_HELD: dict[str, int] = {}  # realpath of a lock file -> the descriptor this process holds it by


def checkpoint_dir(env: Mapping[str, str]) -> Path:
    """A stage's checkpoint directory from its environment (pure): $CAPSULE_CHECKPOINT_DIR, else
    <models volume>/.checkpoints/<project>-<stage>, else ./checkpoints (relative to its workdir)."""
    if env.get("CAPSULE_CHECKPOINT_DIR"):
        return Path(env["CAPSULE_CHECKPOINT_DIR"])
    models = env.get("CAPSULE_MODELS_DIR")
    if models:
        return Path(models) / ".checkpoints" / f"{env.get('CAPSULE_PROJECT', 'project')}-{env.get('CAPSULE_STAGE', 'train')}"
    return Path("checkpoints")


def _key(directory: Path) -> str:
    return os.path.realpath(directory / LOCK_FILE)


def holder(directory: str | Path) -> str | None:
    """Who holds <directory>/.lock now (its text), or None when nobody does."""
    key = _key(Path(directory))
    if key in _HELD:
        return os.pread(_HELD[key], 4096, 0).decode("utf-8", "replace").strip() or "this process"
    try:
        fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # F_GETLK asks without taking the lock (a probe that took it could refuse a real writer).
        # struct flock on LP64 Linux: short type, short whence, off_t start, off_t len, pid_t pid.
        req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, *_ = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, req))
        if l_type == fcntl.F_UNLCK:
            return None
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
    finally:
        os.close(fd)


def acquire(directory: str | Path, who: str) -> None:
    """Hold <directory>/.lock until this process ends (or release()); CheckpointBusy when another holds it."""
    directory = Path(directory)
    key = _key(directory)
    if key in _HELD:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        other = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)  # this process held no lock on the file: closing loses nothing
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise CheckpointBusy(busy_message(directory, other)) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, who.encode(), 0)
    _HELD[key] = fd


def release(directory: str | Path) -> None:
    fd = _HELD.pop(_key(Path(directory)), None)
    if fd is not None:
        os.close(fd)


def busy_message(directory: Path, other: str) -> str:
    """The one line a refused second writer shows (pure)."""
    job = other.split()[0] if other.split() and ":" in other.split()[0] else None
    cancel = f"`capsule jobs cancel {job}`" if job else "stop it"
    return (f"checkpoint directory {directory} is in use by {other}: two runs must not share it; "
            f"wait for it to end, {cancel}, or give this run its own CAPSULE_CHECKPOINT_DIR")
