"""Why a job failed, the same on every backend (pure): its exit code, the failing rank and node,
the reason, and the tail of its log.

torchrun exits 1 whatever a rank did (launch/torchrun.py: 75 when a rank saved a checkpoint); its
error summary names the rank, its node and its own code, so the job reports the rank's code (a
Kubernetes pod's torchrun included).
"""
from __future__ import annotations

import re
from typing import Iterable

from ..errors import rank_cause
from .api import JobState

# Exit code of a rank that saved a checkpoint on SIGTERM (torchcapsule.train.signals): the
# job was preempted, not broken; a requeued run resumes from the checkpoint. 75 = EX_TEMPFAIL.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_LINE = "torchcapsule: preempted by signal"  # printed by torchcapsule.train.Preemption.exit


def failed_rank(torchrun_output: str) -> tuple[int, int, str | None] | None:
    """(rank, exitcode, host) of the root-cause failure in torchrun's error summary, if it printed one.

        rank      : 1 (local_rank: 1)
        exitcode  : 3 (pid: 7511)
    A rank killed by a signal shows a negative exitcode (-9).
    """
    # Several nodes: one summary per node, lines prefixed by srun --label ("1: "). The root cause
    # is a rank that exited by itself, not one killed (negative code) when the job was torn down.
    found = None
    for text in torchrun_output.split("Root Cause")[1:] or [torchrun_output]:
        m_rank = re.search(r"^(?:\d+: )?\s*rank\s*:\s*(\d+)", text, re.M)
        m_code = re.search(r"^(?:\d+: )?\s*exitcode\s*:\s*(-?\d+)", text, re.M)
        m_host = re.search(r"^(?:\d+: )?\s*host\s*:\s*(\S+)", text, re.M)
        if m_rank and m_code:
            here = int(m_rank.group(1)), int(m_code.group(1)), m_host.group(1) if m_host else None
            if found is None or (found[1] < 0 <= here[1]):
                found = here
    return found


def shell_exit_code(code: int) -> int:
    """A process's exit code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - code if code < 0 else code


def explain_failure(code: int | None, log: str = "", *, context: Iterable[str | None] = (),
                    tail_lines: int = 20) -> tuple[int | None, str]:
    """(exit code, reason) of a failed job.

    code: its exit code as the backend saw it (negative: killed by that signal; None: unknown).
    log: the end of its output; torchrun's summary there gives the failing rank's own code and node,
    and the rank's own last line (errors.RANK_CAUSE) its cause.
    context: what the backend itself says first (a Slurm state, an OOM kill, a Kubernetes condition).
    tail_lines: how many last lines of `log` follow the reason (0: none, e.g. the log is local).
    """
    found = failed_rank(log) if log else None
    if found is not None:
        rank, rcode, host = found
        code, on = shell_exit_code(rcode), f" on {host}" if host else ""
        if rcode == PREEMPTED_EXIT_CODE:
            why = f"preempted: rank {rank}{on} saved a checkpoint and exited {rcode}; rerun to resume"
        elif rcode < 0:
            why = f"rank {rank} was killed by signal {-rcode} (exit code {code}){on}"
        else:
            why = f"rank {rank} failed with exit code {rcode}{on}"
        cause = rank_cause(log, rank)  # the last line the rank printed itself (train/dist.py)
        why += f": {cause}" if cause else ""
    elif PREEMPTED_LINE in log:
        code, why = PREEMPTED_EXIT_CODE, f"preempted: the ranks saved a checkpoint and exited {PREEMPTED_EXIT_CODE}; rerun to resume"
    elif code is not None and code < 0:
        code, why = shell_exit_code(code), f"killed by signal {-code}"
    else:
        why = f"exited with code {code}" if code is not None else None
    reason = "; ".join(c for c in (*context, why) if c) or "failed"
    tail = "\n".join(log.splitlines()[-tail_lines:]) if tail_lines and log else ""
    return code, reason + (f"\n{tail}" if tail.strip() else "")


def ended_state(code: int | None) -> JobState:
    """The state of a job that ended without succeeding, from its explained exit code (pure):
    ranks that saved a checkpoint on SIGTERM (75: preemption, a time limit, a signal from outside
    that was not `capsule jobs cancel`) were stopped, not broken: CANCELLED, and a rerun resumes."""
    return JobState.CANCELLED if code == PREEMPTED_EXIT_CODE else JobState.FAILED
