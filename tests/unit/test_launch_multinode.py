"""Several nodes in one log: the failing rank's own code and node from torchrun's summaries."""
from __future__ import annotations

from torchcapsule.launch.failure import failed_rank

# What `capsule jobs logs` showed on the two-node cluster (srun --label): the second node's rank 3
# exited 7, and that node's torchrun SIGTERMed its other rank; the first node's step was cancelled.
TWO_NODES = """\
1: [rank1]:rank 3 fails on purpose on capsule-mn2
1: torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
1: ============================================================
1: node_stage.py FAILED
1: ------------------------------------------------------------
1: Failures:
1: [1]:
1:   time      : 2026-12-02_06:30:40
1:   host      : capsule-mn2
1:   rank      : 2 (local_rank: 0)
1:   exitcode  : -15 (pid: 1414)  (SIGTERM)
1:   error_file: <N/A>
1:   traceback : Signal 15 (SIGTERM) received by PID 1414
1: ------------------------------------------------------------
1: Root Cause (first observed failure):
1: [0]:
1:   time      : 2026-12-02_06:30:40
1:   host      : capsule-mn2
1:   rank      : 3 (local_rank: 1)
1:   exitcode  : 7 (pid: 1416)
1:   error_file: <N/A>
1: ============================================================
srun: error: capsule-mn2: task 1: Exited with exit code 1
0: slurmstepd-capsule-mn1: error: *** STEP 12.0 ON capsule-mn1 CANCELLED AT 2026-12-02T06:30:48 ***
"""

# The first node's torchrun, killed while tearing down, printed its own (later) summary.
KILLED_LATER = """\
0: Root Cause (first observed failure):
0: [0]:
0:   host      : capsule-mn1
0:   rank      : 0 (local_rank: 0)
0:   exitcode  : -15 (pid: 1300)
"""


def test_labelled_summary_of_the_failing_node_gives_its_rank_and_code():
    assert failed_rank(TWO_NODES) == (3, 7, "capsule-mn2")


def test_a_rank_killed_in_the_teardown_is_not_the_root_cause():
    assert failed_rank(TWO_NODES + KILLED_LATER)[:2] == (3, 7)
    assert failed_rank(KILLED_LATER)[:2] == (0, -15)  # alone, it is what there is
