"""launch/command.py (a stage's argv and env) and launch/failure.py (failure parsing), pure."""
from __future__ import annotations

from pathlib import Path

import pytest

from torchcapsule.config import GpuRequest
from torchcapsule.errors import BackendError, ConfigError
from torchcapsule.launch.api import JobSpec
from torchcapsule.launch.command import capsule_env, entrypoint, nproc, stage_env, torchrun_command
from torchcapsule.launch.failure import failed_rank, shell_exit_code


def spec(command=("train.py", "--epochs", "30"), **kw) -> JobSpec:
    vols = {v: Path(f"/p/{v}") for v in ("workspace", "data", "models", "logs")}
    base = dict(project="digits", stage="train", command=tuple(command), image="digits:x",
                workdir=Path("/p"), volumes=vols, distributed="ddp", retries=2, cpus=2)
    base.update(kw)
    return JobSpec(**base)


@pytest.mark.parametrize("cmd,want", [
    (["train.py", "--epochs", "3"], ["train.py", "--epochs", "3"]),
    (["python", "train.py", "-x"], ["train.py", "-x"]),
    (["/usr/bin/python3.11", "train.py"], ["train.py"]),
    (["python", "-m", "pkg.train", "--lr", "1"], ["-m", "pkg.train", "--lr", "1"]),
    (["-m", "pkg.train"], ["-m", "pkg.train"]),
])
def test_entrypoint_forms(cmd, want):
    assert entrypoint(cmd) == want


@pytest.mark.parametrize("cmd,needle", [
    (["python"], "needs a script"),
    (["python", "-m"], "needs a module"),
    (["python", "-c", "print(1)"], "'-c'"),
    (["bash", "run.sh"], "'bash' is not a .py file"),
])
def test_entrypoint_refuses_non_python(cmd, needle):
    with pytest.raises(ConfigError, match=needle):
        entrypoint(cmd, stage="train")


def test_torchrun_command_full():
    argv = torchrun_command(spec(), nproc_per_node=2, rdzv_endpoint="127.0.0.1:41000", log_dir="/p/logs/x")
    assert argv[:3] == ["python", "-m", "torchcapsule.launch.torchrun"]  # the image's python by default
    opts = dict(zip(argv[3:-3:2], argv[4:-3:2]))
    assert opts["--nnodes"] == "1" and opts["--nproc_per_node"] == "2"
    assert opts["--rdzv_backend"] == "c10d" and opts["--rdzv_endpoint"] == "127.0.0.1:41000"
    assert opts["--max_restarts"] == "2" and opts["--rdzv_id"] == "digits-train"
    assert opts["--log_dir"] == "/p/logs/x"
    assert argv[-3:] == ["train.py", "--epochs", "30"]
    assert "29500" not in " ".join(argv)


def test_torchrun_command_multinode_and_interpreter():
    argv = torchrun_command(spec(nodes=4), nproc_per_node=8, rdzv_endpoint="node1:5000",
                            node_rank=3, rdzv_id="job-7", python="/opt/venv/bin/python")
    assert argv[:3] == ["/opt/venv/bin/python", "-m", "torchcapsule.launch.torchrun"]
    assert argv[argv.index("--nnodes") + 1] == "4"
    assert argv[argv.index("--node_rank") + 1] == "3"
    assert argv[argv.index("--rdzv_id") + 1] == "job-7"
    argv2 = torchrun_command(spec(nodes=4), nproc_per_node=1, rdzv_endpoint="h:1", nnodes=2)
    assert argv2[argv2.index("--nnodes") + 1] == "2"
    with pytest.raises(ValueError):
        torchrun_command(spec(), nproc_per_node=0, rdzv_endpoint="h:1")


def test_nproc_gpus_cpus_and_too_many_gpus():
    assert nproc(spec(gpus=GpuRequest(count=4)), gpus_visible=8) == 4
    assert nproc(spec(gpus=GpuRequest(count=4))) == 4  # a cluster grants what was asked
    assert nproc(spec(cpus=2), gpus_visible=0) == 2
    assert nproc(spec(cpus=None), gpus_visible=0) == 1
    assert nproc(spec(distributed="none", gpus=GpuRequest(count=4)), gpus_visible=0) == 1
    with pytest.raises(BackendError, match=r"asks for 2 GPUs per node but this machine has 0 GPUs; pass --gpus 0"):
        nproc(spec(gpus=GpuRequest(count=2)), gpus_visible=0)


def test_env_volumes_threads_and_stage_env_wins():
    env = stage_env(spec(env={"FOO": "1", "OMP_NUM_THREADS": "7"}), nproc=2, cpu_count=16)
    assert env["CAPSULE_PROJECT"] == "digits" and env["CAPSULE_STAGE"] == "train"
    assert env["CAPSULE_MODELS_DIR"] == "/p/models" and env["CAPSULE_LOGS_DIR"] == "/p/logs"
    assert env["FOO"] == "1" and env["OMP_NUM_THREADS"] == "7"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts need a fresh store
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in stage_env(spec(distributed="none"), nproc=1, cpu_count=2)
    assert stage_env(spec(cpus=None), nproc=4, cpu_count=16)["OMP_NUM_THREADS"] == "4"
    assert stage_env(spec(cpus=2), nproc=2, cpu_count=16)["OMP_NUM_THREADS"] == "1"
    mounted = capsule_env(spec(), mounts={"models": "/models", "logs": "/logs", "data": "/data"})
    assert mounted["CAPSULE_MODELS_DIR"] == "/models" and "CAPSULE_WORKSPACE_DIR" not in mounted


def test_failed_rank_parses_torchrun_summary():
    out = """t.py FAILED
Failures:
  <NO_OTHER_FAILURES>
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_14:37:51
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 7511)
"""
    assert failed_rank(out)[:2] == (1, 3)
    assert failed_rank(out.replace(": 3 (pid", ": -9 (pid"))[:2] == (1, -9)
    assert failed_rank("all good") is None
    assert shell_exit_code(-9) == 137 and shell_exit_code(3) == 3
