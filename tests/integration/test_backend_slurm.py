"""The Slurm backend against the real single-node cluster (scripts/start-services.sh):
sbatch + srun torchrun with 2 ranks, a failing stage, cancel, logs, requeue + resume, bad input."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_capsule
from tests.integration.backend_support import copy_example, job_id_in, status as _status, wait_for as _wait

pytestmark = pytest.mark.usefixtures("slurm_cluster")


@pytest.fixture
def project() -> Path:
    """A private copy of the example (the jobs write its models/logs) with `fail` and `sleep` stages."""
    dest = copy_example("capsule-slurm-")
    yield dest
    shutil.rmtree(dest.parent, ignore_errors=True)


def _job_id(stderr: str) -> str:
    return job_id_in(stderr, "slurm")


def test_dry_run_prints_the_sbatch_script(project):
    r = run_capsule("run", "train", "--on", "slurm", "--dry-run", cwd=project, check=True)
    assert r.stdout.startswith("#!/bin/bash\n#SBATCH --job-name=digits-train")
    assert "srun --kill-on-bad-exit=1" in r.stdout and "--nproc_per_node 2" in r.stdout
    assert not (project / "logs").exists()  # a dry run submits and writes nothing


def test_train_two_ranks_through_sbatch_srun_torchrun(project):
    r = run_capsule("run", "train", "--on", "slurm", cwd=project, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = _job_id(r.stderr)
    assert "[rank0]:" in r.stdout  # the log streamed while the job ran
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["params"]["world_size"] == 2 and meta["metrics"]["accuracy"] >= 0.9
    st = _status(job_id, project)
    assert (st["state"], st["exit_code"]) == ("SUCCEEDED", 0)
    logs = run_capsule("jobs", "logs", job_id, cwd=project, check=True).stdout
    assert f"torchcapsule: job {job_id.split(':')[1]} on localhost" in logs and "saved" in logs
    listed = json.loads(run_capsule("jobs", "list", "--on", "slurm", "--json", cwd=project, check=True).stdout)
    assert job_id in [j["job_id"] for j in listed["jobs"]]


def test_failing_stage_is_failed_with_its_exit_code_and_log_tail(project):
    r = run_capsule("run", "fail", "--on", "slurm", cwd=project, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    job_id = _job_id(r.stderr)
    assert "failed" in r.stderr
    st = _status(job_id, project)
    assert (st["state"], st["exit_code"]) == ("FAILED", 3)
    assert "bad input on purpose" in st["reason"]


def test_cancel_moves_a_running_job_to_cancelled(project):
    r = run_capsule("run", "sleep", "--on", "slurm", "--detach", cwd=project, check=True)
    job_id = r.stdout.strip()
    assert re.fullmatch(r"slurm:\d+", job_id)
    assert _wait(job_id, project, {"RUNNING"}, timeout=120)["state"] == "RUNNING"
    run_capsule("jobs", "cancel", job_id, cwd=project, check=True)
    st = _wait(job_id, project, {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=60)
    assert st["state"] == "CANCELLED"
    logs = run_capsule("jobs", "logs", job_id, cwd=project, check=True).stdout
    assert "torchcapsule: job" in logs and "CANCELLED" in logs


def test_requeue_sigterms_the_ranks_which_checkpoint_and_resume(project):
    """What preemption does: Slurm requeues the job, SIGTERMs the step, runs the script again.

    Ordered by events, not by how fast the machine trains (a loaded machine once finished all
    150 epochs before the requeue landed): the first run cannot finish on its own, so only the
    requeue's SIGTERM ends it, and the requeued run (SLURM_RESTART_COUNT=1) has little left to do.
    """
    from torchcapsule.config import load_project
    from torchcapsule.launch import get_backend
    from torchcapsule.launch.spec import job_spec

    (project / "gated.py").write_text(
        "import os\nimport train\n"
        "first = os.environ.get('SLURM_RESTART_COUNT', '0') == '0'\n"
        "train.main(['--epochs', '100000' if first else '12'])\n")
    text = (project / "capsule.yaml").read_text()
    (project / "capsule.yaml").write_text(text.replace("train.py --epochs 30", "gated.py"))
    p = load_project(project)
    backend = get_backend("slurm", project=p)
    job_id = backend.submit(job_spec(p, "train"))
    native = job_id.split(":")[1]
    deadline = time.monotonic() + 300
    while not any("epoch 2/" in line for line in backend.logs(job_id)):
        assert time.monotonic() < deadline and not backend.status(job_id).state.terminal
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", native], check=True)
    # Slurm holds a requeued job for a while (BeginTime); let it start as soon as it can.
    deadline = time.monotonic() + 120
    while (state := backend.status(job_id).state.value) != "PENDING" and "restart 1)" not in \
            "\n".join(backend.logs(job_id)):
        assert time.monotonic() < deadline, f"the requeued job never came back ({state})"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={native}", "StartTime=now"], capture_output=True)
    st = backend.wait(job_id, poll_s=2, timeout_s=600)
    log = "\n".join(backend.logs(job_id))
    assert st.state.value == "SUCCEEDED", log[-3000:]
    assert "restart 1)" in log and "checkpoint saved" in log
    assert re.search(r"resumed from step \d+", log)


def test_bad_input_is_one_line_with_the_fix(project):
    r = run_capsule("jobs", "status", "slurm:99999999", cwd=project)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "Slurm does not know job 99999999" in r.stderr and "capsule jobs list" in r.stderr
    r = run_capsule("run", "train", "--on", "slurm", "--gpus", "H100:1", cwd=project)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "offers no GPUs" in r.stderr and "--gpus 0" in r.stderr
    r = run_capsule("run", "train", "--on", "slurm", cwd=project, env={"PATH": "/nonexistent"})
    assert r.returncode == 1 and "`sbatch` is not on PATH" in r.stderr
