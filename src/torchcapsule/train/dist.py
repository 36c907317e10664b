"""init_distributed(): torch.distributed from torchrun's environment, or a single process without it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain
`python train.py` sets none of them and gets world_size 1 with no process group, so the same
script runs in a notebook, under torchrun on a laptop's CPU, and on a GPU cluster.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when running as a single process without a group
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def pick_backend(cuda_available: bool) -> str:
    """nccl when this process has a GPU, gloo on CPU (pure; init_distributed probes)."""
    return "nccl" if cuda_available else "gloo"


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes, set this rank's device, return who we are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _write_pid_file(rank)
    _install_cause_line(rank)
    if world <= 1 and "MASTER_ADDR" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None, device=device)
    chosen = backend or os.environ.get("CAPSULE_DIST_BACKEND") or pick_backend(cuda)
    if not dist.is_initialized():
        from datetime import timedelta

        kwargs = {"device_id": device} if chosen == "nccl" else {}
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, backend=chosen, device=device)


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failure_cause(exc: BaseException) -> str:
    """The one line that says why a rank failed (pure): a torchcapsule error is already that line."""
    from ..errors import CapsuleError

    if isinstance(exc, CapsuleError):
        return str(exc)
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _install_cause_line(rank: int) -> None:
    """After an uncaught exception's traceback (which stays in the log), print its cause as the last line."""
    previous = sys.excepthook
    if getattr(previous, "_torchcapsule", False):
        return

    from ..errors import RANK_CAUSE

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if not issubclass(exc_type, KeyboardInterrupt):
            print(RANK_CAUSE.format(rank=rank, cause=failure_cause(exc)), file=sys.stderr, flush=True)

    hook._torchcapsule = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, *, per_rank: bool = False) -> int:
    """Seed Python, NumPy (if present) and torch; per_rank adds the rank (e.g. for data augmentation)."""
    s = seed + (int(os.environ.get("RANK", "0")) if per_rank else 0)
    random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(s % 2**32)
    except ImportError:
        pass
    return s


def _write_pid_file(rank: int) -> None:
    """<logs>/pids/rank-N.pid: lets operators (and the fault tests) find a rank's process."""
    logs = os.environ.get("CAPSULE_LOGS_DIR")
    if not logs:
        return
    d = Path(logs) / "pids"
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")
    except OSError:
        pass  # a read-only logs volume must not stop training
