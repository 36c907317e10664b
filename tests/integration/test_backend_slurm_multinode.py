"""The Slurm backend on the real two-node cluster (scripts/slurm-multinode.sh; SLURM_CONF selects
it): `capsule run train --on slurm --nodes 2` runs 2 nodes x 2 gloo ranks with torchrun's c10d
rendezvous on the allocation's first node; one node's failing rank fails the job with its exit code
and node; cancel ends both nodes' processes; a requeued job resumes across the nodes."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_capsule
from tests.integration.backend_support import add_node_stages, copy_example, job_id_in, status as _status, wait_for as _wait
from torchcapsule.launch._proc import pid_alive


@pytest.fixture
def project(slurm_multinode) -> Path:
    dest = copy_example("capsule-slurm-mn-")
    add_node_stages(dest, fail_host="capsule-mn2")
    yield dest
    shutil.rmtree(dest.parent, ignore_errors=True)


def _ranks(project: Path, n: int, timeout: float = 300) -> dict[int, tuple[str, int]]:
    """rank -> (host, pid), once `n` ranks have written their marker."""
    mark = project / "logs" / "ranks"
    deadline = time.monotonic() + timeout
    while True:
        files = list(mark.glob("rank*")) if mark.is_dir() else []
        if len(files) >= n:
            out = {}
            for f in files:
                host, pid = f.read_text().split()
                out[int(f.name[4:])] = (host, int(pid))
            return out
        assert time.monotonic() < deadline, f"only {len(files)} of {n} ranks started"
        time.sleep(0.5)


def test_train_on_two_nodes_two_ranks_each(project, slurm_multinode):
    r = run_capsule("run", "train", "--on", "slurm", "--nodes", "2", cwd=project, env=slurm_multinode, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = job_id_in(r.stderr, "slurm")
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["params"]["world_size"] == 4 and meta["metrics"]["accuracy"] >= 0.9
    logs = run_capsule("jobs", "logs", job_id, cwd=project, env=slurm_multinode, check=True).stdout
    native = job_id.split(":")[1]
    assert f"torchcapsule: job {native} on capsule-mn[1-2]" in logs
    # The rendezvous is on the allocation's first node, not localhost; each node's lines are labelled.
    assert re.search(r"rendezvous capsule-mn1:\d+, 2 node\(s\)", logs), logs[:2000]
    assert re.search(r"(?m)^0: ", logs) and re.search(r"(?m)^1: ", logs)
    st = _status(job_id, project, env=slurm_multinode)
    assert (st["state"], st["exit_code"]) == ("SUCCEEDED", 0)


def test_one_nodes_failing_rank_fails_the_job_with_its_code_and_node(project, slurm_multinode):
    r = run_capsule("run", "nodefail", "--on", "slurm", cwd=project, env=slurm_multinode, timeout=600)
    assert r.returncode == 7, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = job_id_in(r.stderr, "slurm")
    st = _status(job_id, project, env=slurm_multinode)
    assert (st["state"], st["exit_code"]) == ("FAILED", 7)
    assert "capsule-mn2" in st["reason"], st["reason"]
    # no rank that started outlived the failure (the job is over: a rank torn down before it
    # wrote its marker never will, so read the markers there are, at least the failing node's)
    for host, pid in _ranks(project, 1, timeout=5).values():
        assert not pid_alive(pid), f"rank on {host} (pid {pid}) still runs"


def test_cancel_ends_both_nodes_processes(project, slurm_multinode):
    r = run_capsule("run", "nodesleep", "--on", "slurm", "--detach", cwd=project, env=slurm_multinode, check=True)
    job_id = r.stdout.strip()
    ranks = _ranks(project, 4)
    assert {h for h, _ in ranks.values()} == {"capsule-mn1", "capsule-mn2"}
    run_capsule("jobs", "cancel", job_id, cwd=project, env=slurm_multinode, check=True)
    st = _wait(job_id, project, {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=120, env=slurm_multinode)
    assert st["state"] == "CANCELLED"
    deadline = time.monotonic() + 120  # Slurm's KillWait, then SIGKILL
    while any(pid_alive(pid) for _, pid in ranks.values()):
        assert time.monotonic() < deadline, [(h, p) for h, p in ranks.values() if pid_alive(p)]
        time.sleep(0.5)


def test_requeue_resumes_across_nodes(project, slurm_multinode, monkeypatch):
    from torchcapsule.config import load_project
    from torchcapsule.launch import get_backend
    from torchcapsule.launch.spec import job_spec

    monkeypatch.setenv("SLURM_CONF", slurm_multinode["SLURM_CONF"])  # the backend's sbatch/scontrol calls
    text = (project / "capsule.yaml").read_text()
    (project / "capsule.yaml").write_text(text.replace("train.py --epochs 30", "train.py --epochs 150"))
    p = load_project(project)
    backend = get_backend("slurm", project=p)
    job_id = backend.submit(job_spec(p, "train", nodes=2))
    native = job_id.split(":")[1]
    deadline = time.monotonic() + 600
    while not any("epoch 10/" in line for line in backend.logs(job_id)):
        assert time.monotonic() < deadline and not backend.status(job_id).state.terminal
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", native], check=True)
    # Slurm holds a requeued job for a while (BeginTime); let it start as soon as it can.
    for _ in range(120):
        if backend.status(job_id).state.value == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={native}", "StartTime=now"], capture_output=True)
            break
        time.sleep(0.5)
    st = backend.wait(job_id, poll_s=2, timeout_s=900)
    log = "\n".join(backend.logs(job_id))
    assert st.state.value == "SUCCEEDED", log[-3000:]
    assert "restart 1)" in log and "checkpoint saved" in log
    assert re.search(r"resumed from step \d+", log)
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["params"]["world_size"] == 4
