"""torchrun for ddp stages: `python -m torchcapsule.launch.torchrun <torchrun options> train.py ...`.

This runs torch.distributed.run's `main` in this process with the same options. Two endings are
changed, both because ranks that saved a checkpoint on SIGTERM exit 75 (train/signals.py,
launch/failure.py PREEMPTED_EXIT_CODE):

- When a rank of a failed worker group exited 75, the group is not restarted. The agent stops the
  other ranks as it does for any failure, and this process exits 75. Plain torchrun counts 75 as a
  failure, so a SIGTERM sent to the ranks alone (Slurm's signal to the step, a `kill`) would use up
  one of `--max_restarts` and train on, when it should end the job as preempted.
- When this process gets SIGTERM/SIGINT, the agent still passes the signal on to the ranks and
  waits for them, as torchrun does. Afterwards it prints one line instead of the SignalException
  traceback. It exits 75 if a rank saved (exited 75), else 128 + the signal, like any other
  interrupted command.

A failed group's summary (rank, exit code, host; launch/failure.py reads it) is printed without
torchrun's own traceback, and the exit code is torchrun's 1.

The hook is `PreemptionAgent`, a LocalElasticAgent whose `_monitor_workers` sets the remaining
restarts to 0. It is put where torch.distributed.launcher.api builds its agent
(`launch_agent` calls the module's `LocalElasticAgent`). tests/unit/test_launch_torchrun.py
fails if those torch internals move.
"""
from __future__ import annotations

import signal
import sys
from typing import Iterable

from .failure import PREEMPTED_EXIT_CODE

TORCHRUN_FAILED = 1  # what torchrun exits with when a worker group failed, whatever the rank did


def stops_restarts(exitcodes: Iterable[int | None]) -> bool:
    """A failed group in which a rank exited 75 was preempted (it saved a checkpoint): don't restart it."""
    return PREEMPTED_EXIT_CODE in set(exitcodes)


def exit_code(rank_exitcodes: Iterable[int | None], signum: int | None = None) -> int:
    """The launcher's exit code once its ranks ended without succeeding (pure).

    rank_exitcodes: how the ranks ended (negative: killed by that signal; None: unknown).
    signum: the signal this process got, if that is why it ended. A rank that saved gives 75,
    which the backends' ended_state calls CANCELLED. Otherwise a signalled launcher gives
    128 + signal, and a failed group gives torchrun's 1.
    """
    if stops_restarts(rank_exitcodes):
        return PREEMPTED_EXIT_CODE
    if signum is not None:
        return 128 + int(signum)
    return TORCHRUN_FAILED


def _agent_class():
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class PreemptionAgent(LocalElasticAgent):
        """LocalElasticAgent that does not restart a preempted group and keeps the ranks' exit codes."""

        rank_exitcodes: dict[int, int | None] = {}

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and self._remaining_restarts > 0 and stops_restarts(
                    f.exitcode for f in result.failures.values()):
                print(f"torchcapsule: a rank saved a checkpoint and exited {PREEMPTED_EXIT_CODE} "
                      "(preempted); not restarting the ranks", file=sys.stderr, flush=True)
                self._remaining_restarts = 0  # _invoke_run then stops the group and returns it FAILED
            return result

        def _shutdown(self, death_sig=signal.SIGTERM, timeout=30):
            super()._shutdown(death_sig, timeout)
            # After a signal the ranks have been stopped and waited for: how did they end?
            handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
            PreemptionAgent.rank_exitcodes = {r: h.proc.poll() for r, h in handlers.items()}

    return PreemptionAgent


def install():
    """Make torch.distributed.launcher.api build a PreemptionAgent; returns its class."""
    import torch.distributed.launcher.api as launcher_api

    agent = _agent_class()
    launcher_api.LocalElasticAgent = agent
    return agent


def _signal_cause(e: BaseException):
    """The SignalException that ended the launcher (also when another exception wraps it), or None."""
    from torch.distributed.elastic.multiprocessing import SignalException

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SignalException):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    agent = install()
    try:
        torchrun.main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        print(str(e).strip("\n"), file=sys.stderr, flush=True)  # the summary failure.py reads
        return exit_code(codes)
    except Exception as e:
        sig = _signal_cause(e)
        if sig is None:
            raise  # a bug or a rendezvous error: keep its traceback
        codes = list(agent.rank_exitcodes.values())
        code = exit_code(codes, signal.Signals(sig.sigval))
        ranks = "the ranks saved a checkpoint" if code == PREEMPTED_EXIT_CODE else (
            "ranks ended " + ", ".join(str(c) for c in codes) if codes else "no ranks were running")
        print(f"torchcapsule: torchrun got {signal.Signals(sig.sigval).name}; {ranks}; exit {code}",
              file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
