"""launch/_proc.py and launch/_command.py: log following, tails, one-line errors (pure-ish)."""
from __future__ import annotations

import threading
import time

import pytest

from torchcapsule.errors import BackendError
from torchcapsule.launch import _proc
from torchcapsule.launch._command import explain_failure, shell_join


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


def test_explain_failure_without_summary_keeps_the_code():
    assert explain_failure(1, "plain crash\n") == (1, None)
    assert explain_failure(1, "    rank      : 0 (local_rank: 0)\n    exitcode  : -9 (pid: 3)\n") == (137, "rank 0 exited with 137")
