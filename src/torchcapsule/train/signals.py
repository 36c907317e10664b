"""Preemption: SIGTERM (what Slurm, Kubernetes and `capsule jobs cancel` send) -> checkpoint, exit 75.

The handler only sets a flag; the training loop calls `preempted()` at a step boundary, where
the state is consistent. In DDP the flag is OR-reduced over ranks so every rank stops at the
same step even when only one of them got the signal, and rank 0 writes the checkpoint.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL; the same value as launch.torchrun.PREEMPTED_EXIT_CODE


class Preemption:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self._flag = False
        self.signum: int | None = None
        self._previous: dict[int, Callable | int | None] = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        self.signum = signum

    @property
    def requested(self) -> bool:
        """This process got a signal (local view, no communication)."""
        return self._flag

    def preempted(self) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on all ranks)."""
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = torch.tensor([1 if self._flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self._flag = bool(t.item())
        return self._flag

    def exit(self, code: int = PREEMPTED_EXIT_CODE) -> None:
        """Leave the process group and exit with the preemption code (after the checkpoint)."""
        import os

        from .dist import cleanup

        cleanup()
        # A fixed line the local backend recognises (torchrun itself exits 1 when signalled).
        print(f"torchcapsule: preempted by signal {self.signum or 0} on rank {os.environ.get('RANK', '0')}; "
              f"exiting {code} (rerun to resume from the checkpoint)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(code)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
