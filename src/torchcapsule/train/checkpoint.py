"""Atomic, resumable checkpoints that load without unpickling arbitrary objects.

Layout (one directory per checkpoint, the step in its name):

    <dir>/ckpt-000000420/model.safetensors   the model's state_dict (safetensors: no pickle)
    <dir>/ckpt-000000420/state.pt            optimizer, scheduler, grad scaler, RNG states, step,
                                             extra; loaded with torch.load(weights_only=True)

    <dir>/ckpt-000000420/manifest.json       {"step", "files": {name: {"size", "sha256"}}}
    <dir>/.lock                              fcntl lock: one writing job per directory

A save writes everything into `.tmp-ckpt-...-PID`, fsyncs each file and the directory, then
renames it to `ckpt-...` (rename is atomic on POSIX). A crash mid-save leaves only a .tmp
directory, which loading ignores and the next start removes, so the previous checkpoint stays
the latest good one. Resume verifies a checkpoint (sizes, safetensors header, sha256 from the
manifest) and falls back to the newest good one, saying so in one line.

One writer per directory: the first resume()/save() of rank 0 takes an fcntl lock on <dir>/.lock
and holds it for the life of the process (the kernel releases it when the process dies). A job
whose launcher already holds that lock for the job's whole life says so in
$CAPSULE_CHECKPOINT_LOCK_HELD, and its ranks do not take it again.
In DDP rank 0 decides which checkpoint to resume from and broadcasts it, rank 0 writes and all
ranks meet at a barrier; every rank loads the same files.
Sharded state (FSDP / torch.distributed.checkpoint) is not handled here.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import dirlock
from .._util import sha256_file
from ..errors import CheckpointError
from .dist import collective_device

_NAME = re.compile(r"^ckpt-(\d{9})$")
MODEL_FILE = "model.safetensors"
FINISHED_FILE = "FINISHED"  # written by finish(): the next run starts fresh instead of resuming
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LOCK_HELD_ENV = "CAPSULE_CHECKPOINT_LOCK_HELD"  # the holder text of a launcher that holds <dir>/.lock for the job
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def default_checkpoint_dir() -> Path:
    """$CAPSULE_CHECKPOINT_DIR, else <models volume>/.checkpoints/<project>-<stage>, else ./checkpoints."""
    return dirlock.checkpoint_dir(os.environ)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers (their state_dict keys carry prefixes)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values (so weights_only loading accepts them)."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be trusted, or None when it verifies (pure reads).

    Sizes and sha256 against the manifest written at save, and the safetensors header against
    the file's size. A checkpoint written before manifests existed is checked by its header only.
    """
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
    recorded: dict[str, dict] = {}
    if (path / MANIFEST_FILE).exists():
        try:
            recorded = json.loads((path / MANIFEST_FILE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST_FILE} is unreadable"
    for name, rec in recorded.items():
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size != rec.get("size"):
            return f"{name} is {size} bytes, {rec.get('size')} were written"
    problem = _safetensors_problem(path / MODEL_FILE)
    if problem:
        return f"{MODEL_FILE}: {problem}"
    for name, rec in recorded.items():
        if sha256_file(path / name) != rec.get("sha256"):
            return f"{name}: checksum mismatch"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """An 8-byte length, a JSON header, then exactly the bytes the header's offsets describe."""
    from ..registry.checksums import is_safetensors

    if not is_safetensors(path):
        return "safetensors header"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and len(t.get("data_offsets") or ()) == 2]
    if 8 + n + max(ends, default=0) != path.stat().st_size:
        return "safetensors data is truncated or padded"
    return None


def disk_full(exc: BaseException) -> bool:
    """Whether exc (or what caused it) is a full disk or quota. safetensors and torch.save wrap
    the OSError in their own errors, so their text is checked too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _holder_text() -> str:
    job = os.environ.get("CAPSULE_JOB_ID")
    who = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{job} ({who})" if job else who


def _say(line: str) -> None:
    print(f"torchcapsule: {line}", file=sys.stderr, flush=True)


class Checkpointer:
    """Save and resume model + optimizer + scheduler + scaler + RNG + step, keeping the last `keep`."""

    def __init__(self, directory: str | Path | None = None, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 scaler: Any = None, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory) if directory is not None else default_checkpoint_dir()
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.keep = keep
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded (None: started fresh)
        self.skipped: list[tuple[Path, str]] = []  # corrupt checkpoints resume() set aside (rank 0)
        self._owned = False

    # -- discovery ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Completed checkpoints, oldest first (temporary directories of unfinished saves are ignored)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        cks = self.checkpoints()
        return cks[-1][1] if cks else None

    def _path(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:09d}"

    # -- ownership ---------------------------------------------------------------------------
    def _own_directory(self) -> None:
        """Rank 0, once: become the directory's only writer, then clear dead saves' leftovers.

        The lock is held until this process ends. A launcher that holds it for the whole job
        (across torchrun restarts) names itself in $CAPSULE_CHECKPOINT_LOCK_HELD.
        """
        if self._owned:
            return
        held = os.environ.get(LOCK_HELD_ENV)
        if not (held and dirlock.holder(self.directory) == held):
            dirlock.acquire(self.directory, _holder_text())  # CheckpointBusy names the other run
        # Only the lock holder gets here, so every .tmp directory is a dead save's.
        for p in self.directory.glob(".tmp-ckpt-*"):
            shutil.rmtree(p, ignore_errors=True)
        self._owned = True

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, *, extra: dict[str, Any] | None = None) -> Path | None:
        """Write checkpoint `step` atomically (rank 0 writes; a collective in DDP). Returns its path on rank 0."""
        rank = _rank()
        final = self._path(step)
        if rank == 0:
            self._own_directory()
            self._write(final, step, extra or {})
        if _dist_on():
            dist.barrier()
        return final if rank == 0 else None

    def _write(self, final: Path, step: int, extra: dict[str, Any]) -> None:
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        try:
            self._write_tmp(tmp, step, extra)
            old = self.directory / f".old-{final.name}-{os.getpid()}"
            if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save must not fill the volume further
            if disk_full(e):
                raise CheckpointError(
                    f"no space left on device writing {final}: free space there or move the checkpoints "
                    "(volumes.models in capsule.yaml, or CAPSULE_CHECKPOINT_DIR)") from e
            raise
        self._prune()

    def _write_tmp(self, tmp: Path, step: int, extra: dict[str, Any]) -> None:
        from safetensors.torch import save_model

        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(unwrap(self.model), str(tmp / MODEL_FILE))  # handles tied weights
        _fsync_file(tmp / MODEL_FILE)
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "extra": extra,
        }
        torch.save(state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                 for n in (MODEL_FILE, STATE_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)

    def _prune(self) -> None:
        cks = self.checkpoints()
        for _, p in cks[: max(0, len(cks) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)

    def finish(self, step: int) -> None:
        """Mark the run complete (rank 0; call on all ranks): the next resume() starts fresh."""
        if _rank() == 0 and self.directory.is_dir():
            (self.directory / FINISHED_FILE).write_text(f"{step}\n")
        if _dist_on():
            dist.barrier()

    # -- load --------------------------------------------------------------------------------
    def load(self, path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Restore everything from one checkpoint directory; returns {"step", "extra"}."""
        from safetensors.torch import load_model

        path = Path(path)
        load_model(unwrap(self.model), str(path / MODEL_FILE), device=str(_param_device(self.model)))
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return {"step": int(state["step"]), "extra": state["extra"]}

    def resume(self, *, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies; None when starting fresh (a collective in DDP).

        Rank 0 takes the directory's lock, chooses, and broadcasts the step, so the ranks of one
        job always load the same checkpoint. Corrupt checkpoints are moved aside to
        `.corrupt-ckpt-...` (kept, never deleted) with one line saying which and why.
        After a run that called finish(), its checkpoints are stale: they are removed (by rank 0)
        and the run starts from step 0, so a scheduled retrain really retrains.
        """
        self.resumed_from = None
        step = self._choose() if _rank() == 0 else None
        if _dist_on():
            t = torch.tensor([-1 if step is None else step], dtype=torch.int64, device=collective_device())
            dist.broadcast(t, src=0)
            step = None if int(t.item()) < 0 else int(t.item())
        if step is None:
            return None
        got = self.load(self._path(step), map_location=map_location)
        self.resumed_from = self._path(step)
        return got

    def _choose(self) -> int | None:
        """Rank 0: the step to resume from, after the FINISHED reset and verification (effects)."""
        self._own_directory()
        if (self.directory / FINISHED_FILE).exists():
            for _, p in self.checkpoints():
                shutil.rmtree(p, ignore_errors=True)
            (self.directory / FINISHED_FILE).unlink(missing_ok=True)
            return None
        self.skipped = []
        chosen = None
        for step, path in reversed(self.checkpoints()):
            problem = checkpoint_problem(path)
            if problem is None:
                chosen = step
                break
            aside = self.directory / f".corrupt-{path.name}"
            n = 1
            while aside.exists():
                aside, n = self.directory / f".corrupt-{path.name}.{n}", n + 1
            os.rename(path, aside)
            self.skipped.append((path, problem))
        if self.skipped:
            bad = "; ".join(f"checkpoint {p} is corrupt ({why})" for p, why in self.skipped)
            then = f"resuming from {self._path(chosen).name}" if chosen is not None else \
                "no good checkpoint is left, starting from step 0"
            _say(f"{bad}; kept as .corrupt-*; {then}")
        return chosen


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _param_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
