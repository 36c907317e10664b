"""Local backend: the pure outcome mapping and the dry run (no process is started)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from torchcapsule.config import parse_project
from torchcapsule.errors import BackendError, JobNotFound
from torchcapsule.launch import JobState
from torchcapsule.launch.local import LocalBackend, job_status
from torchcapsule.launch.spec import job_spec

SUMMARY = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : {code} (pid: 1)\n"


@pytest.mark.parametrize("rc,tail,cancelled,want", [
    (0, "", False, (JobState.SUCCEEDED, 0, None)),
    (1, SUMMARY.format(code=3), False, (JobState.FAILED, 3, "rank 1 failed with exit code 3")),
    (1, SUMMARY.format(code=-9), False, (JobState.FAILED, 137, "rank 1 was killed by signal 9 (exit code 137)")),
    (4, "", False, (JobState.FAILED, 4, "exited with code 4")),
    (-9, "", False, (JobState.FAILED, 137, "killed by signal 9")),
    (-15, "", True, (JobState.CANCELLED, 143, "cancelled")),
])
def test_job_status(rc, tail, cancelled, want):
    st = job_status("local:x", rc, tail, cancelled=cancelled)
    assert (st.state, st.exit_code, st.reason) == want


def test_job_status_preempted_and_cancelled():
    tail = "torchcapsule: preempted by signal 15 on rank 0; exiting 75 (rerun to resume)\nSignalException"
    st = job_status("local:x", 1, tail, cancelled=True)
    assert st.state is JobState.CANCELLED and st.exit_code == 75 and st.reason.startswith("preempted")
    assert job_status("local:x", 1, SUMMARY.format(code=75), cancelled=False).exit_code == 75


def _project(tmp_path: Path):
    text = """
name: demo
stages:
  train: {run: "python train.py --epochs 2", distributed: ddp, resources: {cpus: 2}, retries: 1}
  hello: {run: "python -c 'print(1)'", env: {GREETING: hi}}
"""
    (tmp_path / "capsule.yaml").write_text(text)
    return parse_project(text, tmp_path / "capsule.yaml")


def test_dryrun_text_is_the_exact_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    dr = LocalBackend().dryrun(job_spec(_project(tmp_path), "train"))
    req = dr.request
    assert req.argv[:3] == [sys.executable, "-m", "torchcapsule.launch.torchrun"]
    assert req.argv[req.argv.index("--nproc_per_node") + 1] == "2"
    assert req.argv[req.argv.index("--max_restarts") + 1] == "1"
    assert req.argv[-3:] == ["train.py", "--epochs", "2"]
    assert req.env["CAPSULE_LOGS_DIR"] == str(tmp_path / "logs") and req.env["OMP_NUM_THREADS"] == "1"
    assert " ".join(req.argv[3:]) in dr.text.replace("\\\n", "") and "CAPSULE_STAGE=train" in dr.text
    hello = LocalBackend().dryrun(job_spec(_project(tmp_path), "hello")).request
    assert hello.argv == [sys.executable, "-c", "print(1)"] and hello.env["GREETING"] == "hi"


def test_refusals_before_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    project = _project(tmp_path)
    with pytest.raises(BackendError, match="asks for 2 GPUs per node but this machine has 1 GPU;"):
        LocalBackend().dryrun(job_spec(project, "train", gpus=2))
    with pytest.raises(BackendError, match="--nodes 2: the local backend"):
        LocalBackend().dryrun(job_spec(project, "train", nodes=2))
    with pytest.raises(BackendError, match="script train.py not found"):
        LocalBackend().submit(job_spec(project, "train", gpus=0))
    with pytest.raises(JobNotFound, match="capsule jobs list"):
        LocalBackend().status("local:nope")
    assert LocalBackend().list() == []


def test_a_plain_script_stage_runs_with_the_stage_interpreter(tmp_path, monkeypatch):
    """`run: evaluate.py` (no ddp) really runs locally, as it does on docker/slurm/kubernetes."""
    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path / "home"))
    text = "name: demo\nstages:\n  evaluate: {run: \"evaluate.py --split test\"}\n"
    (tmp_path / "capsule.yaml").write_text(text)
    (tmp_path / "evaluate.py").write_text(
        "import os, sys\nprint('evaluated', sys.argv[1:], os.environ['CAPSULE_STAGE'], sys.executable)\n")
    backend = LocalBackend()
    job_id = backend.submit(job_spec(parse_project(text, tmp_path / "capsule.yaml"), "evaluate"))
    st = backend.wait(job_id, poll_s=0.1, timeout_s=120)
    log = list(backend.logs(job_id))
    assert (st.state, st.exit_code) == (JobState.SUCCEEDED, 0), log
    assert f"evaluated ['--split', 'test'] evaluate {sys.executable}" in log
