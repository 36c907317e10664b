"""`python -m torchcapsule.launch.torchrun` for real: torch's elastic agent, real rank processes
(small scripts that don't import torch, so each case takes seconds)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO

from .train_support import wait_for

pytestmark = [pytest.mark.integration]

# Each start of a rank leaves a file; a rank that saved exits 75 (as torchcapsule.train.Preemption does).
RANK = """
import os, pathlib, signal, sys, time
mode = sys.argv[1]
if mode == "saves":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
pathlib.Path(os.environ["STARTS"], f"rank{os.environ['RANK']}-{os.getpid()}").write_text("")
if mode == "preempted" and os.environ["RANK"] == "1":
    sys.exit(75)
if mode == "fails" and os.environ["RANK"] == "1":
    sys.exit(3)
time.sleep(120)
"""


def _start(tmp_path, mode, restarts=2):
    (tmp_path / "rank.py").write_text(RANK)
    starts = tmp_path / "starts"
    starts.mkdir()
    env = {**os.environ, "STARTS": str(starts)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    p = subprocess.Popen([sys.executable, "-m", "torchcapsule.launch.torchrun", "--nproc_per_node", "2",
                          "--max_restarts", str(restarts), "--standalone", "--monitor_interval", "0.2",
                          str(tmp_path / "rank.py"), mode],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p, starts


def test_a_rank_that_exits_75_ends_the_group_without_a_restart(tmp_path):
    p, starts = _start(tmp_path, "preempted")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 75, out
    assert len(list(starts.iterdir())) == 2, out  # one attempt: no retry spent on a preemption
    assert "not restarting the ranks" in out and "Traceback" not in out
    assert "exitcode  : 75" in out  # torchrun's summary stays, for launch/failure.py


def test_a_failing_rank_is_still_restarted_and_exits_1_with_the_summary(tmp_path):
    p, starts = _start(tmp_path, "fails", restarts=1)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1, out
    assert len(list(starts.iterdir())) == 4, out  # two attempts of two ranks
    assert "exitcode  : 3" in out and "Root Cause" in out
    assert "Traceback" not in out and "ChildFailedError" not in out


@pytest.mark.parametrize("mode,code,says", [
    ("saves", 75, "the ranks saved a checkpoint; exit 75"),
    ("plain", 143, "ranks ended -15, -15; exit 143"),
])
def test_sigterm_to_the_launcher_is_one_line_and_the_ranks_exit_code(tmp_path, mode, code, says):
    p, starts = _start(tmp_path, mode)
    wait_for(lambda: len(list(starts.iterdir())) == 2, 120, "both ranks to start")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == code, out
    assert f"torchcapsule: torchrun got SIGTERM; {says}" in out.strip().splitlines()[-1]
    assert "Traceback" not in out and "SignalException" not in out
