"""The preemption flag is a latch: a signal that lands while the ranks are inside the all_reduce is
never lost (issue 13: the reduced 0 overwrote it and the ranks trained on until SIGKILL).

Two real gloo processes race an interval timer's signal against `Preemption.preempted()` thousands
of times, the signal landing on rank 0, rank 1 or both at random moments around the collective.
Each trial asserts: once a rank's handler has run, its next `preempted()` is True, and both ranks
stop at the same call. No timing decides the outcome: a lost signal is a failed assertion.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback

TRIALS = 2000


def _rank_main(rank: int, store: str, trials: int, errors: str) -> None:
    try:
        import random
        import time

        import torch
        import torch.distributed as dist

        from torchcapsule.train import Preemption

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        t = torch.zeros(1)
        t0 = time.perf_counter()
        for _ in range(50):
            dist.all_reduce(t)
        collective_s = (time.perf_counter() - t0) / 50  # only spreads the signal around the collective
        for trial in range(trials):
            who = random.Random(trial).choice((0, 1, "both"))  # both ranks draw the same target
            p = Preemption(signals=(signal.SIGALRM,))
            if who in (rank, "both"):
                delay = random.Random(trial * 2 + rank).uniform(0.0, 3.0 * collective_s)
                signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-6))
            calls = 0
            while True:
                delivered = p.signum is not None  # the handler ran before this call
                stop = p.preempted()
                calls += 1
                if delivered and not stop:
                    raise AssertionError(f"trial {trial}: rank {rank} got signal {p.signum} before "
                                         f"call {calls} but preempted() said False: the signal was lost")
                if stop:
                    break
            # Disarmed; an alarm that already fired is handled at the next bytecodes, by this
            # trial's handler, before the next trial's Preemption exists.
            signal.setitimer(signal.ITIMER_REAL, 0)
            n = torch.tensor([calls, -calls])
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            if n[0].item() != -n[1].item():
                raise AssertionError(f"trial {trial}: the ranks stopped at different calls ({n.tolist()})")
        dist.destroy_process_group()
    except BaseException:
        with open(f"{errors}.{rank}", "w") as fh:
            fh.write(f"rank {rank}: {traceback.format_exc()}")
        os._exit(1)  # do not leave the other rank waiting in a collective: the parent ends it


def test_signal_during_all_reduce_is_never_lost(tmp_path):
    ctx = mp.get_context("spawn")
    errors = tmp_path / "error"
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), TRIALS, str(errors))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        from multiprocessing.connection import wait

        pending = {p.sentinel: p for p in procs}
        while pending:
            # Event-driven: the first rank to end (passing or failing) wakes us; a failed rank
            # means the other may block forever in a collective, so it is ended here.
            for s in wait(list(pending), timeout=600):
                p = pending.pop(s)
                p.join()
                if p.exitcode != 0:
                    found = sorted(tmp_path.glob("error.*"))
                    raise AssertionError(found[0].read_text() if found else f"a rank exited {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
