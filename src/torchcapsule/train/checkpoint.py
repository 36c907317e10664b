"""Atomic, resumable checkpoints that load without unpickling arbitrary objects.

Layout (one directory per checkpoint, the step in its name):

    <dir>/ckpt-000000420/model.safetensors   the model's state_dict (safetensors: no pickle)
    <dir>/ckpt-000000420/state.pt            optimizer, scheduler, grad scaler, RNG states, step,
                                             extra; loaded with torch.load(weights_only=True)

A save writes everything into `.tmp-ckpt-...` , fsyncs each file and the directory, then
renames it to `ckpt-...` (rename is atomic on POSIX). A crash mid-save leaves only a .tmp
directory, which loading ignores, so the previous checkpoint stays the latest good one.
In DDP rank 0 writes and all ranks meet at a barrier; every rank loads the same files.
Sharded state (FSDP / torch.distributed.checkpoint) is not handled here.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_NAME = re.compile(r"^ckpt-(\d{9})$")
MODEL_FILE = "model.safetensors"
FINISHED_FILE = "FINISHED"  # written by finish(): the next run starts fresh instead of resuming
STATE_FILE = "state.pt"


def default_checkpoint_dir() -> Path:
    """$CAPSULE_CHECKPOINT_DIR, else <models volume>/.checkpoints/<project>-<stage>, else ./checkpoints."""
    if os.environ.get("CAPSULE_CHECKPOINT_DIR"):
        return Path(os.environ["CAPSULE_CHECKPOINT_DIR"])
    models = os.environ.get("CAPSULE_MODELS_DIR")
    if models:
        name = f"{os.environ.get('CAPSULE_PROJECT', 'project')}-{os.environ.get('CAPSULE_STAGE', 'train')}"
        return Path(models) / ".checkpoints" / name
    return Path("checkpoints")


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

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, *, extra: dict[str, Any] | None = None) -> Path | None:
        """Write checkpoint `step` atomically (rank 0 writes; a collective in DDP). Returns its path on rank 0."""
        rank = dist.get_rank() if _dist_on() else 0
        final = self.directory / f"ckpt-{step:09d}"
        if rank == 0:
            self._write(final, step, extra or {})
        if _dist_on():
            dist.barrier()
        return final if rank == 0 else None

    def _write(self, final: Path, step: int, extra: dict[str, Any]) -> None:
        from safetensors.torch import save_model

        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
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
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune()

    def _prune(self) -> None:
        cks = self.checkpoints()
        for _, p in cks[: max(0, len(cks) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.directory.glob(".tmp-ckpt-*"):  # leftovers of crashed saves
            if not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)

    def finish(self, step: int) -> None:
        """Mark the run complete (rank 0; call on all ranks): the next resume() starts fresh."""
        if (dist.get_rank() if _dist_on() else 0) == 0 and self.directory.is_dir():
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
        """Load the latest completed checkpoint if there is one; None when starting fresh.

        After a run that called finish(), its checkpoints are stale: they are removed (by rank 0)
        and the run starts from step 0, so a scheduled retrain really retrains.
        """
        if (self.directory / FINISHED_FILE).exists():
            if _dist_on():
                dist.barrier()  # every rank has seen the marker before rank 0 removes it
            if (dist.get_rank() if _dist_on() else 0) == 0:
                for _, p in self.checkpoints():
                    shutil.rmtree(p, ignore_errors=True)
                (self.directory / FINISHED_FILE).unlink(missing_ok=True)
            if _dist_on():
                dist.barrier()
            return None
        latest = self.latest()
        if latest is None:
            return None
        return self.load(latest, map_location=map_location)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _param_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
