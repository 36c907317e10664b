"""Faults for real: kill -9 a rank, SIGTERM the job, a failing rank, bad input."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

from torchcapsule.train import read_metrics

from .train_support import capsule, checkpoints, example_copy, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _job_id(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _events(project, name):
    path = project / "logs" / "metrics-train.jsonl"
    return [m for m in read_metrics(path) if m.get("event") == name] if path.exists() else []


def test_kill9_rank_restarts_and_resumes_from_checkpoint(tmp_path):
    # More epochs than the default only so the kill surely lands mid-training on a fast machine.
    project = example_copy(tmp_path, epochs=60)
    job = _job_id(capsule(project, tmp_path, "run", "train", "--detach"))
    wait_for(lambda: checkpoints(project), 120, "the first checkpoint")
    pid = int((project / "logs" / "pids" / "rank-1.pid").read_text())
    os.kill(pid, signal.SIGKILL)

    logs = capsule(project, tmp_path, "jobs", "logs", job, "--follow")
    st = json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)
    assert st["state"] == "SUCCEEDED", logs.stdout[-3000:]
    resumed = _events(project, "resumed")
    assert len(resumed) == 1 and resumed[0]["step"] > 0  # restarted from a checkpoint, not step 0
    assert re.search(rf"resumed from step {resumed[0]['step']}\b", logs.stdout)
    assert "exitcode: -9" in logs.stdout  # torchrun saw the killed rank and restarted the group
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["metrics"]["accuracy"] >= 0.95 and meta["step"] == 60 * 22


def test_sigterm_saves_checkpoint_and_next_run_resumes(tmp_path):
    # 150 epochs (about 20 s on a quiet 2-core machine) so that `capsule jobs cancel`, itself a
    # Python start-up, surely lands mid-training; the ranks handle SIGTERM from "started" on.
    project = example_copy(tmp_path, epochs=150)
    job = _job_id(capsule(project, tmp_path, "run", "train", "--detach"))
    wait_for(lambda: _events(project, "started"), 120, "training to start")
    assert capsule(project, tmp_path, "jobs", "cancel", job).returncode == 0
    wait_for(lambda: json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)["state"]
             in ("CANCELLED", "FAILED", "SUCCEEDED"), 90, "the job to stop")
    st = json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)
    log = capsule(project, tmp_path, "jobs", "logs", job).stdout
    assert st["state"] == "CANCELLED" and st["exit_code"] == 75, f"{st}\n{log[-4000:]}"
    # torchrun (launch/torchrun.py) ends in one line, not SignalException's traceback
    assert "torchcapsule: torchrun got SIGTERM; the ranks saved a checkpoint; exit 75" in log, log[-4000:]
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]
    for f in (project / "logs" / "pids").glob("rank-*.pid"):  # no rank outlives its job
        assert not running(int(f.read_text())), f.name
    preempted = _events(project, "preempted")
    assert len(preempted) == 1
    step = preempted[0]["step"]
    assert f"ckpt-{step:09d}" in checkpoints(project)  # saved at the step it stopped, not a periodic one

    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert _events(project, "resumed")[-1]["step"] == step
    assert f"resumed from step {step}" in r.stdout


def test_failing_rank_is_named_and_its_exit_code_propagates(tmp_path):
    project = example_copy(tmp_path, extra_stages={
        "broken": {"run": "broken.py", "distributed": "ddp", "resources": {"cpus": 2}}})
    (project / "broken.py").write_text(
        "import sys\nfrom torchcapsule.train import init_distributed\n"
        "info = init_distributed()\nimport time\n"
        "sys.exit(7) if info.rank == 1 else time.sleep(30)\n")
    r = capsule(project, tmp_path, "run", "broken")
    assert r.returncode == 7, r.stderr
    assert "rank 1 failed with exit code 7" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,code,needle", [
    (["run", "trian"], 2, "no stage 'trian'"),
    (["run", "train", "--gpus", "8"], 1, "asks for 8 GPUs per node but this machine has 0 GPUs"),
    (["run", "nofile"], 1, "script missing.py not found"),
    (["jobs", "status", "local:nope"], 1, "no local job 'local:nope'"),
    (["run", "train", "--on", "mars"], 1, "unknown backend 'mars'"),
])
def test_bad_input_is_one_line(tmp_path, args, code, needle, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    project = example_copy(tmp_path, extra_stages={"nofile": {"run": "missing.py", "distributed": "ddp"}})
    r = capsule(project, tmp_path, *args, timeout=60)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (project / "logs").exists()  # refused before anything was launched


def test_killed_launcher_leaves_no_rank_behind(tmp_path):
    project = example_copy(tmp_path, extra_stages={
        "sleepy": {"run": "sleepy.py", "distributed": "ddp", "resources": {"cpus": 2}}})
    (project / "sleepy.py").write_text(
        "import time\nfrom torchcapsule.train import init_distributed\ninit_distributed()\ntime.sleep(120)\n")
    job = _job_id(capsule(project, tmp_path, "run", "sleepy", "--detach"))
    pids = project / "logs" / "pids"
    wait_for(lambda: len(list(pids.glob("rank-*.pid"))) == 2, 120, "both ranks to start")
    ranks = [int(f.read_text()) for f in pids.glob("rank-*.pid")]
    state_file = tmp_path / "home" / "jobs" / job.partition(":")[2] / "state.json"
    os.kill(json.loads(state_file.read_text())["pid"], signal.SIGKILL)  # torchrun itself

    wait_for(lambda: json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)["state"]
             == "FAILED", 60, "the job to fail")
    st = json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)
    assert st["exit_code"] == 137, st
    wait_for(lambda: not [p for p in ranks if running(p)], 10, "the orphaned ranks to be killed")


def test_non_ddp_stage_is_retried(tmp_path):
    flaky = "import pathlib, sys; p = pathlib.Path('tries'); n = int(p.read_text()) if p.exists() else 0; " \
            "p.write_text(str(n + 1)); print('try', n + 1); sys.exit(0 if n >= 1 else 5)"
    project = example_copy(tmp_path, extra_stages={
        "flaky": {"run": f'python -c "{flaky}"', "retries": 2},
        "hopeless": {"run": 'python -c "import sys; sys.exit(6)"', "retries": 1}})
    r = capsule(project, tmp_path, "run", "flaky")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (project / "tries").read_text() == "2" and "retry 1/2" in r.stdout
    r = capsule(project, tmp_path, "run", "hopeless")
    assert r.returncode == 6 and r.stdout.count("retry") == 1, r.stdout + r.stderr
