"""Training that survives everything (issue 13), on the real local launcher with the digits example."""
from __future__ import annotations

import json
import os

import pytest

from torchcapsule.train import read_metrics

from .train_support import capsule, checkpoints, example_copy, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _events(project, name):
    path = project / "logs" / "metrics-train.jsonl"
    return [m for m in read_metrics(path) if m.get("event") == name] if path.exists() else []


def _status(project, tmp_path, job):
    return json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)


def test_every_cancel_saves_a_checkpoint_and_exits_75(tmp_path):
    """The lost-SIGTERM bug ended 3 of 11 cancels with SIGKILL and no checkpoint; each of these must
    preempt cleanly, and each rerun resumes from exactly where the previous one stopped."""
    project = example_copy(tmp_path, epochs=400)
    stopped_at = 0
    for i in range(3):
        r = capsule(project, tmp_path, "run", "train", "--detach")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        began = lambda: len(_events(project, "started")) + len(_events(project, "resumed")) == i + 1  # noqa: E731
        wait_for(began, 180, f"run {i + 1} to start training")
        assert capsule(project, tmp_path, "jobs", "cancel", job).returncode == 0
        wait_for(lambda: _status(project, tmp_path, job)["state"] in ("CANCELLED", "FAILED", "SUCCEEDED"),
                 180, f"run {i + 1} to stop")
        st = _status(project, tmp_path, job)
        log = capsule(project, tmp_path, "jobs", "logs", job).stdout
        assert (st["state"], st["exit_code"]) == ("CANCELLED", 75), f"run {i + 1}: {st}\n{log[-4000:]}"
        preempted = _events(project, "preempted")
        assert len(preempted) == i + 1, log[-4000:]
        step = preempted[-1]["step"]
        assert f"ckpt-{step:09d}" in checkpoints(project)  # the checkpoint of the step it stopped at
        if i:
            assert _events(project, "resumed")[-1]["step"] == stopped_at  # resumed where the last run stopped
        assert step >= stopped_at
        stopped_at = step
        for f in (project / "logs" / "pids").glob("rank-*.pid"):
            assert not running(int(f.read_text())), f"{f.name} outlived its job"


def test_corrupt_newest_checkpoints_are_skipped_and_the_rerun_resumes_from_a_good_one(tmp_path):
    project = example_copy(tmp_path, epochs=3)  # 66 steps: checkpoints at 20, 40, 60
    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ckdir = project / "models" / ".checkpoints" / "digits-train"
    (ckdir / "FINISHED").unlink()  # as if the run had died after its last checkpoint
    assert checkpoints(project) == ["ckpt-000000020", "ckpt-000000040", "ckpt-000000060"]
    model = ckdir / "ckpt-000000060" / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)
    state = ckdir / "ckpt-000000040" / "state.pt"
    state.write_bytes(os.urandom(state.stat().st_size))

    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    said = [line for line in (r.stdout + r.stderr).splitlines() if "is corrupt" in line]
    assert len(said) == 1, said  # one line for both, on rank 0 only
    assert "ckpt-000000060 is corrupt (model.safetensors" in said[0]
    assert "ckpt-000000040 is corrupt (state.pt: checksum mismatch)" in said[0]
    assert said[0].endswith("resuming from ckpt-000000020")
    assert "resumed from step 20 " in r.stdout and "resumed from step 60" not in r.stdout
    assert _events(project, "resumed")[-1]["step"] == 20
    assert (ckdir / ".corrupt-ckpt-000000060").is_dir()  # kept for inspection, not deleted


def _run_detached(project, tmp_path, *extra):
    r = capsule(project, tmp_path, "run", "train", "--detach", *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _began(project, n):
    return lambda: len(_events(project, "started")) + len(_events(project, "resumed")) >= n


def test_second_run_of_a_stage_is_refused_and_force_takes_over(tmp_path):
    project = example_copy(tmp_path, epochs=400)
    first = _run_detached(project, tmp_path)
    wait_for(_began(project, 1), 180, "the first run to start training")
    r = capsule(project, tmp_path, "run", "train")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"already running as {first}" in lines[0] and f"`capsule jobs cancel {first}`" in lines[0]
    assert "--force" in lines[0]
    second = _run_detached(project, tmp_path, "--force")  # cancels the first, which checkpoints
    st = _status(project, tmp_path, first)
    assert (st["state"], st["exit_code"]) == ("CANCELLED", 75), st
    stopped = _events(project, "preempted")[-1]["step"]
    wait_for(_began(project, 2), 180, "the second run to start training")
    assert _events(project, "resumed")[-1]["step"] == stopped  # it took over the first one's progress
    assert capsule(project, tmp_path, "jobs", "cancel", second).returncode == 0


def _pids(project):
    return [int(f.read_text()) for f in (project / "logs" / "pids").glob("rank-*.pid")]


def test_sigterm_to_the_ranks_only_ends_the_job_preempted_without_spending_a_retry(tmp_path):
    """Slurm's signal to the step or a `kill` reaches the ranks, not torchrun: they save and exit 75.
    Plain torchrun counted that as a failure and restarted them (retries: 2 in the example)."""
    import signal

    project = example_copy(tmp_path, epochs=400)
    job = _run_detached(project, tmp_path)
    wait_for(_began(project, 1), 180, "training to start")
    for pid in _pids(project):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _status(project, tmp_path, job)["state"] in ("CANCELLED", "FAILED", "SUCCEEDED"),
             180, "the job to stop")
    st = _status(project, tmp_path, job)
    log = capsule(project, tmp_path, "jobs", "logs", job).stdout
    assert (st["state"], st["exit_code"]) == ("CANCELLED", 75), f"{st}\n{log[-4000:]}"
    step = _events(project, "preempted")[-1]["step"]
    assert f"ckpt-{step:09d}" in checkpoints(project)
    # one attempt: no restart, no resume, no retraining from the checkpoint just saved
    assert "not restarting the ranks" in log and "will restart worker group" not in log, log[-4000:]
    assert len(_events(project, "started")) == 1 and not _events(project, "resumed")
    attempts = {p.name for p in (project / "logs" / "jobs" / job.partition(":")[2]).glob("*/attempt_*")}
    assert attempts == {"attempt_0"}, attempts
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]
    for pid in _pids(project):
        assert not running(pid)


def test_ranks_die_with_a_killed_supervisor_after_saving_a_checkpoint(tmp_path):
    import signal

    project = example_copy(tmp_path, epochs=400)
    job = _run_detached(project, tmp_path)
    wait_for(_began(project, 1), 180, "training to start")
    ranks = _pids(project)
    supervisor = json.loads((tmp_path / "home" / "jobs" / job.partition(":")[2] / "job.json").read_text())["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not [p for p in ranks if running(p)], 120, "the ranks to end with their supervisor")
    step = _events(project, "preempted")[-1]["step"]  # torchrun got SIGTERM and passed it on
    assert f"ckpt-{step:09d}" in checkpoints(project)


def test_cancel_ends_what_a_dead_supervisor_left_running(tmp_path):
    import signal

    project = example_copy(tmp_path, epochs=400)
    job = _run_detached(project, tmp_path)
    wait_for(_began(project, 1), 180, "training to start")
    ranks = _pids(project)
    jobdir = tmp_path / "home" / "jobs" / job.partition(":")[2]
    torchrun = json.loads((jobdir / "state.json").read_text())["pid"]
    supervisor = json.loads((jobdir / "job.json").read_text())["supervisor_pid"]
    # torchrun stopped first, so neither it nor the supervisor can pass anything on: orphaned ranks
    os.kill(torchrun, signal.SIGSTOP)
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not running(supervisor), 60, "the supervisor to die")
    os.kill(torchrun, signal.SIGKILL)
    assert all(running(p) for p in ranks)
    assert _status(project, tmp_path, job)["state"] == "FAILED"
    r = capsule(project, tmp_path, "jobs", "cancel", job)
    assert r.returncode == 0, r.stderr
    assert not [p for p in ranks if running(p)]
    st = _status(project, tmp_path, job)
    assert st["state"] == "CANCELLED" and "supervisor died" in st["reason"], st
    step = _events(project, "preempted")[-1]["step"]  # SIGTERM first: the ranks checkpointed
    assert f"ckpt-{step:09d}" in checkpoints(project)


_MEASURE = """
import os, subprocess, sys
with open(sys.argv[1], "wb") as fh:
    p = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", *sys.argv[2:]], stdout=fh,
                         stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024)
"""


def _peak_rss_mib(argv, cwd, env, out):
    """Exit code and peak resident memory (MiB) of a capsule command with its stdout to a file.

    Measured from a small fresh Python: a child forked from this torch-laden test process would
    count the parent's memory as its own peak."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _MEASURE, str(out), *argv], cwd=cwd, env={**os.environ, **env},
                       capture_output=True, text=True, check=True)
    code, rss = r.stdout.split()
    return int(code), float(rss)


def test_a_100mb_line_without_newline_is_streamed_in_bounded_pieces(tmp_path):
    from .train_support import capsule_env

    writer = "import sys\nfor _ in range(1600): sys.stdout.write('x' * 65536)\nsys.stdout.flush()\n"
    project = example_copy(tmp_path, extra_stages={"huge": {"run": "python huge.py"}})
    (project / "huge.py").write_text(writer)  # 100 MiB on one line, written in pieces (the writer stays small)
    code, rss = _peak_rss_mib(["run", "huge"], project, capsule_env(tmp_path), tmp_path / "run.out")
    assert code == 0
    assert (tmp_path / "run.out").stat().st_size >= 1600 * 65536
    assert rss < 200, f"capsule run peaked at {rss:.0f} MiB"  # it held the whole line: ~330 MiB
    job = json.loads(capsule(project, tmp_path, "jobs", "list", "--on", "local", "--json").stdout)["jobs"][0]["job_id"]
    code, rss = _peak_rss_mib(["jobs", "logs", job], project, capsule_env(tmp_path), tmp_path / "logs.out")
    assert code == 0 and (tmp_path / "logs.out").stat().st_size >= 1600 * 65536
    assert rss < 200, f"capsule jobs logs peaked at {rss:.0f} MiB"


def test_ctrl_c_exits_130_or_75_once_the_ranks_saved(tmp_path):
    """Ctrl-C once torchrun runs but (on any machine but a very fast one) before the ranks do:
    130 as for any interrupted command, never torchrun's 1; 75 only with a checkpoint."""
    import signal
    import subprocess
    import sys

    from .train_support import capsule_env

    project = example_copy(tmp_path, epochs=400)
    p = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", "run", "train"], cwd=project,
                         env={**os.environ, **capsule_env(tmp_path)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.startswith("job local:"), line
    state = tmp_path / "home" / "jobs" / line.split(":", 1)[1].strip() / "state.json"
    # torchrun started (the ranks take seconds more to import torch): the moment that exited 1
    wait_for(lambda: state.exists() and json.loads(state.read_text())["state"] == "RUNNING", 60, "torchrun")
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=180)
    rest = p.stderr.read()
    assert code == (75 if _events(project, "preempted") else 130), rest
    assert "Traceback" not in rest


def test_disk_full_ends_with_its_cause_and_leaves_no_partial_checkpoint(tmp_path):
    """A full models volume: the last line names the cause (the rank's own one-liner, not
    `rank 0 failed with exit code 1`), and no partial checkpoint stays on the full volume."""
    import subprocess

    import yaml

    from tests.conftest import missing_part

    project = example_copy(tmp_path, epochs=3)
    cfg = project / "capsule.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["stages"]["train"]["retries"] = 0  # the volume stays full: one attempt says it all
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    models = project / "models"
    models.mkdir()
    # 48 KiB: the lock file fits, the first checkpoint (~70 KiB of weights and state) does not
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(models)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        missing_part(f"a small tmpfs for the full volume (mount: {m.stderr.strip()}; needs root)")
    try:
        r = capsule(project, tmp_path, "run", "train")
        assert r.returncode == 1, r.stdout[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert "rank 0 failed" in last and ": no space left on device writing" in last, r.stderr
        assert "ckpt-000000020" in last and "free space there" in last
        job = last.split("(", 1)[1].split(")", 1)[0]
        st = _status(project, tmp_path, job)
        assert st["state"] == "FAILED" and "no space left on device" in st["reason"], st
        assert not list(models.rglob(".tmp-ckpt-*")) and not list(models.rglob("ckpt-*"))
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)
