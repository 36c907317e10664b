"""launch/_proc.py, command.shell_join and failure.explain_failure: log following, tails, one-line errors."""
from __future__ import annotations

import threading
import time

import pytest

from torchcapsule.errors import BackendError
from torchcapsule.launch import _proc
from torchcapsule.launch.command import shell_join
from torchcapsule.launch.failure import explain_failure


def test_follow_file_yields_lines_as_they_arrive_until_done(tmp_path):
    log = tmp_path / "job.out"
    finished = threading.Event()

    def writer():
        time.sleep(0.2)  # the file does not exist yet when following starts
        with open(log, "w") as f:
            f.write("one\ntw")
            f.flush()
            time.sleep(0.3)
            f.write("o\nthree")  # the last line has no newline
        finished.set()

    threading.Thread(target=writer).start()
    lines = list(_proc.follow_file(log, finished.is_set, poll_s=0.05))
    assert lines == ["one", "two", "three"]


def test_tail_and_missing_file(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    assert _proc.tail(f, 3) == "line 97\nline 98\nline 99"
    assert _proc.tail(tmp_path / "none") == ""


def test_missing_binary_and_timeout_are_one_line():
    with pytest.raises(BackendError, match="not on PATH"):
        _proc.run(["/nonexistent/tool"])
    with pytest.raises(BackendError, match="did not answer within 0 s") as e:
        _proc.run(["sleep", "5"], timeout=0.2)
    assert "\n" not in str(e.value)


def test_shell_join_keeps_variables_expandable():
    assert shell_join(["srun", "--rdzv_endpoint", "$head:$port", "a b"]) == "srun --rdzv_endpoint \"$head:$port\" 'a b'"


SUMMARY = "Root Cause (first observed failure):\n[0]:\n  host      : node-2\n  rank      : 1 (local_rank: 1)\n  exitcode  : {code} (pid: 1)\n"


@pytest.mark.parametrize("code,log,kw,want", [
    (1, "plain crash", {"tail_lines": 0}, (1, "exited with code 1")),
    (1, "plain crash", {}, (1, "exited with code 1\nplain crash")),  # the log tail follows the reason
    (-9, "", {}, (137, "killed by signal 9")),
    (None, "", {"context": ("Slurm state TIMEOUT", None)}, (None, "Slurm state TIMEOUT")),
    (1, SUMMARY.format(code=3), {"tail_lines": 0}, (3, "rank 1 failed with exit code 3 on node-2")),
    (1, SUMMARY.format(code=-9), {"tail_lines": 0}, (137, "rank 1 was killed by signal 9 (exit code 137) on node-2")),
    (1, SUMMARY.format(code=75), {"tail_lines": 0},
     (75, "preempted: rank 1 on node-2 saved a checkpoint and exited 75; rerun to resume")),
    (1, "torchcapsule: preempted by signal 15 on rank 0; exiting 75", {"tail_lines": 0, "context": ("OOM",)},
     (75, "OOM; preempted: the ranks saved a checkpoint and exited 75; rerun to resume")),
])
def test_explain_failure(code, log, kw, want):
    assert explain_failure(code, log, **kw) == want


def test_explain_failure_names_the_failed_ranks_own_cause():
    from pathlib import Path

    # recorded: `capsule run train` of examples/digits with a full models volume (2 gloo ranks)
    log = (Path(__file__).parents[1] / "fixtures" / "logs" / "local-disk-full-2-ranks.log").read_text()
    assert explain_failure(1, log, tail_lines=0) == (1, "exited with code 1")  # no summary: no rank known
    # ... and torchrun's summary when it gave up, naming rank 0
    code, reason = explain_failure(1, log + SUMMARY.replace("rank      : 1 (local_rank: 1)", "rank      : 0 (local_rank: 0)")
                                   .format(code=1), tail_lines=0)
    assert code == 1 and reason.startswith("rank 0 failed with exit code 1 on node-2")
    assert ": no space left on device writing /tmp/df/proj/models/" in reason and "\n" not in reason


def test_explain_failure_tail_is_the_last_lines():
    log = "".join(f"line {i}\n" for i in range(50))
    code, reason = explain_failure(2, log, context=("NonZeroExitCode",))
    assert reason.splitlines()[0] == "NonZeroExitCode; exited with code 2"
    assert reason.splitlines()[1:] == [f"line {i}" for i in range(30, 50)]


def test_preempted_ranks_that_saved_end_cancelled_75_on_every_backend():
    """SIGTERM from outside (Slurm preemption or time limit, a Kubernetes eviction, a signal to
    torchrun) with ranks that checkpointed: CANCELLED 75 as docs/training.md says, never FAILED."""
    from torchcapsule.launch import JobState, docker, kubernetes, local, slurm

    log = "[rank1]: torchcapsule: preempted by signal 15 on rank 1; rank 1 exiting 75\n" + SUMMARY.format(code=75)
    seen = {
        "local": local.job_status("local:x", 1, log, cancelled=False),
        "docker": docker.job_status({"State": {"Status": "exited", "ExitCode": 1}}, "docker:x", cancelled=False, log=log),
        "slurm": slurm.job_status({"JobState": "FAILED", "ExitCode": "1:0"}, "slurm:7", log_tail=log),
        "kubernetes": kubernetes.job_status(
            {"metadata": {"name": "x"}, "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}},
            [], "kubernetes:x", log=log),
    }
    for name, st in seen.items():
        assert (st.state, st.exit_code) == (JobState.CANCELLED, 75), (name, st)
        assert st.reason.startswith("preempted: rank 1 on node-2 saved a checkpoint") or \
            "; preempted: rank 1 on node-2 saved a checkpoint" in st.reason, (name, st.reason)
    # a real failure stays FAILED with the rank's own code
    st = local.job_status("local:x", 1, SUMMARY.format(code=3), cancelled=False)
    assert (st.state, st.exit_code) == (JobState.FAILED, 3)


def test_stream_many_merges_lines_as_they_come_and_says_which_ended():
    from torchcapsule.launch._proc import stream_many

    got = list(stream_many([["sh", "-c", "echo a; echo b >&2"], ["sh", "-c", "echo c"]]))
    assert sorted(line for i, line in got if i == 0 and line) == ["a", "b"]
    assert [line for i, line in got if i == 1] == ["c", None]
    assert got[-1][1] is None and sum(line is None for _, line in got) == 2


def test_stream_many_closed_early_stops_its_commands():
    from torchcapsule.launch._proc import stream_many

    it = stream_many([["sh", "-c", "echo $$; exec sleep 300"]])
    i, pid = next(it)
    it.close()  # a reader that stops following (Ctrl-C, `| head`) leaves no `docker logs -f` behind
    assert not _proc.pid_alive(int(pid))
