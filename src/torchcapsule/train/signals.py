"""Preemption: SIGTERM (what Slurm, Kubernetes and `capsule jobs cancel` send) -> checkpoint, exit 75.

The handler only records the signal; the training loop calls `preempted()` at a step boundary,
where the state is consistent. In DDP the request is MAX-reduced over ranks so every rank stops at
the same step even when only one of them got the signal, and rank 0 writes the checkpoint.

The decision is a latch fed by two sources that nothing ever clears: the handler's record of the
signal, and the reduced result. A signal that arrives while the ranks are inside the all_reduce is
not in this round's tensor; it stays recorded and stops every rank at the next call. (Writing the
reduced value back into the handler's flag lost exactly those signals: issue 13.)
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import torch
import torch.distributed as dist

from .dist import collective_device

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL; the same value as launch.failure.PREEMPTED_EXIT_CODE
_RANKS = 1 << 16  # a signal and the rank that got it, packed in one int so one MAX reduces both


class Preemption:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum: int | None = None  # set by the handler only
        self._stop: tuple[int, int] | None = None  # (signal, rank that got it), latched, all ranks agree
        self._previous: dict[int, Callable | int | None] = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """This process got a signal (local view, no communication)."""
        return self.signum is not None

    def preempted(self) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on all ranks)."""
        if self._stop is not None:
            return True
        sig = self.signum  # read once: the handler may run at any bytecode
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            mine = sig * _RANKS + rank if sig is not None else -1
            t = torch.tensor([mine], dtype=torch.int64, device=collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            got = int(t.item())
            if got >= 0:
                self._stop = divmod(got, _RANKS)
        elif sig is not None:
            self._stop = (sig, int(os.environ.get("RANK", "0")))
        return self._stop is not None

    def exit(self, code: int = PREEMPTED_EXIT_CODE) -> None:
        """Leave the process group and exit with the preemption code (after the checkpoint)."""
        from .dist import cleanup

        me = os.environ.get("RANK", "0")
        sig, by = self._stop if self._stop is not None else (self.signum or 0, int(me))
        cleanup()
        # A fixed line the backends recognise when the launcher could not exit 75 itself (killed).
        print(f"torchcapsule: preempted by signal {sig} on rank {by}; rank {me} exiting {code} "
              "(rerun to resume from the checkpoint)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(code)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
