"""Slurm backend: the rendered sbatch script, GRES checks, scontrol parsing and the state table."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from dataclasses import replace
from datetime import timedelta

import pytest

from tests.conftest import EXAMPLE
from torchcapsule.config import GpuRequest, SlurmContainer, SlurmTarget, load_project, parse_gpus
from torchcapsule.errors import BackendError, JobNotFound
from torchcapsule.launch.api import JobState
from torchcapsule.launch.slurm import SLURM_STATES, SlurmBackend, gpu_gres, job_status, parse_record, render_script
from torchcapsule.launch.spec import job_spec

# A real `scontrol show job -o` line from Slurm 22.05 (a job whose script exited 3).
FAILED_LINE = (
    "JobId=2 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 "
    "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=365-00:00:00 TimeMin=N/A "
    "SubmitTime=2026-11-27T14:39:12 EligibleTime=2026-11-27T14:39:12 AccrueTime=2026-11-27T14:39:12 "
    "StartTime=2026-11-27T14:39:12 EndTime=2026-11-27T14:39:13 Deadline=N/A Partition=debug "
    "AllocNode:Sid=localhost:3968 NodeList=localhost BatchHost=localhost NumNodes=1 NumCPUs=1 "
    "TRES=cpu=1,mem=22057M,node=1,billing=1 Command=(null) WorkDir=/tmp/a b Comment=torchcapsule  "
    "StdErr=/tmp/x/s-2.out StdIn=/dev/null StdOut=/tmp/x/s-2.out Power= "
)

# Every job state in Slurm's squeue(1) "JOB STATE CODES" (22.05).
SLURM_DOCUMENTED = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED",
    "REQUEUE_HOLD", "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT",
    "STOPPED", "SUSPENDED", "TIMEOUT",
}


@pytest.fixture(scope="module")
def project():
    return load_project(EXAMPLE)


def directives(script: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M):
        out[m.group(1)] = m.group(2)
    return out


def test_train_script_one_torchrun_per_node_with_rendezvous(project):
    spec = job_spec(project, "train")
    script = render_script(spec, project.targets.slurm, python="/opt/venv/bin/python")
    d = directives(script)
    assert d["nodes"] == "1" and d["ntasks-per-node"] == "1" and d["cpus-per-task"] == "2"
    assert d["mem"] == "4096M" and d["partition"] == "debug" and "requeue" in d
    assert d["output"] == f"{spec.log_dir}/slurm/digits-train-%j.out"
    assert "gpus-per-node" not in d
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "port=$(/opt/venv/bin/python -c" in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("exec srun --kill-on-bad-exit=1 /opt/venv/bin/python -m torchcapsule.launch.torchrun ")
    assert '--rdzv_endpoint "$head_node:$port"' in last and "--nproc_per_node 2" in last
    assert last.endswith("train.py --epochs 30")
    assert "export PATH=/opt/venv/bin:" in script
    assert f"export CAPSULE_MODELS_DIR={spec.volumes['models']}" in script


def test_script_is_valid_bash(project, tmp_path):
    timed = replace(job_spec(project, "train", nodes=2), time_limit=timedelta(hours=1))
    for spec in (job_spec(project, "train"), timed):
        f = tmp_path / "job.sbatch"
        f.write_text(render_script(spec, project.targets.slurm, python="/usr/bin/python3"))
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_targets_and_time_limit(project):
    target = SlurmTarget(partition="gpu", account="proj1", qos="high", constraint="h100", time="02:00:00",
                         extra_directives=("--exclusive",))
    spec = job_spec(project, "train", nodes=4, gpus="H100:8")
    script = render_script(spec, target, python="/p/bin/python")
    d = directives(script)
    assert (d["partition"], d["account"], d["qos"], d["constraint"]) == ("gpu", "proj1", "high", "h100")
    assert d["nodes"] == "4" and d["gpus-per-node"] == "h100:8" and d["time"] == "02:00:00"
    assert d["signal"] == "B:USR1@120" and "exclusive" in d
    # Near the time limit the script requeues itself; Slurm SIGTERMs the ranks (checkpoint) first.
    assert "trap " in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "--nproc_per_node 8" in script and "--nnodes 4" in script


@pytest.mark.parametrize("runtime,expect", [
    ("pyxis", ["--container-image=img:1", "--container-mounts=", "--container-workdir=/workspace"]),
    ("apptainer", ["srun --kill-on-bad-exit=1 apptainer exec --bind ", "--pwd /workspace docker://img:1 python -m torchcapsule.launch.torchrun"]),
])
def test_container_runtimes(project, runtime, expect):
    spec = job_spec(project, "train")
    script = render_script(spec, SlurmTarget(container=SlurmContainer(runtime=runtime, image="img:1")),
                           python="/p/bin/python")
    for piece in expect:
        assert piece in script
    assert "export CAPSULE_MODELS_DIR=/models" in script  # paths as the container sees them
    assert "export PATH=/p/bin" not in script


@pytest.mark.parametrize("req,gres,value,problem", [
    (GpuRequest(), ["(null)"], None, None),
    (GpuRequest(count=2), None, "2", None),  # dry run: rendered without asking the cluster
    (GpuRequest(count=1), [], None, "offers no GPUs"),
    (parse_gpus("H100:4"), ["gpu:h100:8(S:0-1)"], "h100:4", None),
    (parse_gpus("H100:4"), ["gpu:a100:8"], None, "no H100 GPUs (types: a100)"),
    (GpuRequest(count=16), ["gpu:8"], None, "at most 8"),
    (GpuRequest(count=4), ["gpu:a100:4,gpu:a100:4"], "4", None),
])
def test_gpu_gres(req, gres, value, problem):
    got_value, got_problem = gpu_gres(req, gres)
    assert got_value == value
    if problem is None:
        assert got_problem is None
    else:
        assert problem in got_problem


def test_state_table_covers_every_documented_state():
    assert SLURM_DOCUMENTED <= set(SLURM_STATES)
    assert SLURM_STATES["COMPLETED"] is JobState.SUCCEEDED
    for failed in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"):
        assert SLURM_STATES[failed] is JobState.FAILED


def test_parse_record_keeps_values_with_spaces():
    rec = parse_record(FAILED_LINE)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "3:0"
    assert rec["WorkDir"] == "/tmp/a b" and rec["StdOut"] == "/tmp/x/s-2.out"
    assert rec["Comment"] == "torchcapsule" and rec["TRES"] == "cpu=1,mem=22057M,node=1,billing=1"


def test_job_status_failed_has_code_reason_and_tail():
    st = job_status(parse_record(FAILED_LINE), "slurm:2", "line1\nboom")
    assert st.state is JobState.FAILED and st.exit_code == 3
    assert "NonZeroExitCode" in st.reason and st.reason.endswith("line1\nboom")
    assert st.finished_at - st.started_at == 1


@pytest.mark.parametrize("state,code,expect_state,expect_code", [
    ("COMPLETED", "0:0", JobState.SUCCEEDED, 0),
    ("RUNNING", "0:0", JobState.RUNNING, None),
    ("CANCELLED", "0:15", JobState.CANCELLED, 143),
    ("TIMEOUT", "0:0", JobState.FAILED, None),  # never report 0 for a failure
    ("PENDING", "0:0", JobState.PENDING, None),
])
def test_job_status_states(state, code, expect_state, expect_code):
    st = job_status({"JobState": state, "ExitCode": code, "JobName": "x"}, "slurm:1")
    assert (st.state, st.exit_code) == (expect_state, expect_code)


def test_status_recovers_the_failing_ranks_code_from_torchruns_summary():
    log = ("[rank1]:boom\n  Root Cause (first observed failure):\n  [0]:\n    time      : x\n"
           "    host      : localhost\n    rank      : 1 (local_rank: 1)\n    exitcode  : 3 (pid: 7)\n")
    st = job_status({"JobState": "FAILED", "ExitCode": "1:0"}, "slurm:9", log)
    assert st.exit_code == 3 and "rank 1 failed with exit code 3 on localhost" in st.reason


def test_bad_job_id_is_job_not_found(project):
    with pytest.raises(JobNotFound, match=r"slurm:NUMBER"):
        SlurmBackend(project).status("slurm:abc")


def test_no_sbatch_is_one_line_with_fix(project, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match=r"`sbatch` is not on PATH; install Slurm's client") as e:
        SlurmBackend(project).check_available()
    assert "\n" not in str(e.value)


def test_gpu_type_the_cluster_lacks_is_refused_before_sbatch(project, monkeypatch):
    backend = SlurmBackend(project)
    monkeypatch.setattr(backend, "_gres", lambda: ["gpu:a100:4"])
    calls = []
    monkeypatch.setattr("torchcapsule.launch._proc.run", lambda argv, **kw: calls.append(argv))
    dr = backend.dryrun(job_spec(project, "train", gpus="H100:2"))
    with pytest.raises(BackendError, match="no H100 GPUs"):
        backend.schedule(dr)
    assert calls == []  # nothing submitted


def test_time_limit_trap_requeues_and_keeps_sruns_exit_code(project, tmp_path):
    """The rendered script's shell logic, run by bash with stand-ins for srun and scontrol:
    USR1 (sent by Slurm before the time limit) requeues the job, and the script still waits
    for the step and exits with its code."""
    import os
    import signal
    import sys
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    record = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@" >> {record}\n[ "$1" = show ] && echo localhost\nexit 0\n')
    started = tmp_path / "srun.started"
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {started}\nsleep 2\nexit 7\n")
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)
    spec = replace(job_spec(project, "train"), time_limit=timedelta(minutes=10))
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(spec, project.targets.slurm, python=str(bin_dir / "python")))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "localhost"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not started.exists() and time.monotonic() < deadline:  # the trap is set before srun starts
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 7
    assert "requeueing from the last checkpoint" in out
    assert "requeue 42" in record.read_text()


GPU_NODES = (Path(__file__).resolve().parents[1] / "fixtures" / "slurm" / "scontrol-show-node-gpu.txt").read_text()


def test_node_gres_of_a_partition_from_scontrol_show_node():
    from torchcapsule.launch.slurm import node_gres

    assert node_gres(GPU_NODES, "gpu") == ["gpu:h100_80gb:8(S:0-1)"] * 2
    assert node_gres(GPU_NODES, "debug") == []  # the CPU node has Gres=(null)
    assert node_gres(GPU_NODES, None) == ["gpu:h100_80gb:8(S:0-1)"] * 2 + ["gpu:a100:4(S:0)"]


def test_schedule_submits_the_gres_it_checked_against_the_cluster(project, monkeypatch):
    """The dry run renders --gpus-per-node=h100:2 (nothing asked); the submission must carry the
    cluster's own GRES name, h100_80gb:2, that the check resolved (it used to submit the dry run's)."""
    backend = SlurmBackend(project, SlurmTarget(partition="gpu"))
    dr = backend.dryrun(job_spec(project, "train", gpus="H100:2"))
    assert "#SBATCH --gpus-per-node=h100:2" in dr.text
    submitted = []

    def fake_run(argv, stdin=None, **kw):
        if argv[:3] == ["scontrol", "show", "node"]:
            return subprocess.CompletedProcess(argv, 0, GPU_NODES, "")
        assert argv[0] == "sbatch"
        submitted.append(stdin)
        return subprocess.CompletedProcess(argv, 0, "42\n", "")

    monkeypatch.setattr("torchcapsule.launch._proc.run", fake_run)
    assert backend.schedule(dr) == "slurm:42"
    assert "#SBATCH --gpus-per-node=h100_80gb:2\n" in submitted[0]
    assert "h100:2" not in submitted[0].replace("h100_80gb:2", "")


def test_several_nodes_label_each_line_and_say_where_the_rendezvous_is(project):
    script = render_script(job_spec(project, "train", nodes=2), project.targets.slurm, python="/p/bin/python")
    assert 'echo "torchcapsule: rendezvous $head_node:$port, 2 node(s)"' in script
    assert "srun --kill-on-bad-exit=1 --label " in script and "--nnodes 2 " in script
    one = render_script(job_spec(project, "train"), project.targets.slurm, python="/p/bin/python")
    assert "--label" not in one  # one node: lines as torchrun writes them


def test_a_container_runtime_pulls_the_project_image_and_gets_told_which(project):
    assert not SlurmBackend(project).pulls_image  # the project's own interpreter: nothing pulled
    assert SlurmBackend(project, SlurmTarget(container=SlurmContainer(runtime="pyxis"))).pulls_image
    assert not SlurmBackend(project, SlurmTarget(container=SlurmContainer(runtime="pyxis", image="x:1"))).pulls_image
    pinned = "r.example/acme/digits@sha256:" + "ab" * 32
    script = render_script(job_spec(project, "train", image=pinned),
                           SlurmTarget(container=SlurmContainer(runtime="pyxis")), python="/p/bin/python")
    assert f"--container-image={pinned}" in script and f"export CAPSULE_IMAGE={pinned}" in script
    host = render_script(job_spec(project, "train", image=pinned), project.targets.slurm, python="/p/bin/python")
    assert "CAPSULE_IMAGE" not in host  # on the host: lineage says "not in the image"


@pytest.mark.parametrize("time,lead", [("02:00:00", 120), ("10", 60), ("20:00", 120), ("9", None), ("2", None)])
def test_requeue_signal_leaves_time_before_the_limit_and_never_loops(project, time, lead):
    """Slurm may send --signal up to 60 s early: a short limit gets no requeue trap (it would
    requeue at once, every time); Slurm's SIGTERM at the limit still makes the ranks save."""
    from torchcapsule.launch.slurm import signal_lead

    script = render_script(job_spec(project, "train"), SlurmTarget(time=time), python="/p/bin/python")
    d = directives(script)
    assert "time" in d
    if lead is None:
        assert "signal" not in d and "scontrol requeue" not in script
    else:
        assert d["signal"] == f"B:USR1@{lead}" and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert signal_lead(SlurmTarget(time=time).time) == lead
