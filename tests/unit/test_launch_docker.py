"""Docker backend: the rendered `docker run` argv, GPU refusals and the state table (pure)."""
from __future__ import annotations

import pytest

from tests.conftest import EXAMPLE
from torchcapsule.config import DockerTarget, GpuRequest, load_project, parse_gpus
from torchcapsule.errors import BackendError
from torchcapsule.launch import get_backend
from torchcapsule.launch.api import JobState
from torchcapsule.launch.docker import DOCKER_STATES, DockerBackend, gpu_problem, job_status, render_argv
from torchcapsule.launch.spec import job_spec


@pytest.fixture(scope="module")
def project():
    return load_project(EXAMPLE)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_train_argv_runs_two_ranks_as_host_user_with_volumes(project):
    spec = job_spec(project, "train")
    argv = render_argv(spec, DockerTarget(), "digits-train-x", 1234, 567)
    image_at = argv.index(spec.image)
    opts, cmd = argv[:image_at], argv[image_at + 1:]
    assert opts[:2] == ["docker", "run"] and "--detach" in opts
    assert _opt(opts, "--name") == ["digits-train-x"]
    assert _opt(opts, "--user") == ["1234:567"]
    # a setuid file in a volume cannot give the stage root; it needs no capability
    assert _opt(opts, "--security-opt") == ["no-new-privileges"] and _opt(opts, "--cap-drop") == ["ALL"]
    assert "--ipc=host" in opts and not any(a.startswith("--shm-size") for a in opts)
    assert "--hostname=localhost" in opts  # torchrun must resolve its own hostname without DNS
    assert "--gpus" not in opts  # no GPU asked: the flag would fail without the NVIDIA runtime
    vols = dict(v.rsplit(":", 1) for v in _opt(opts, "--volume"))
    assert vols == {str(project.volume_path(k)): f"/{'workspace' if k == 'workspace' else k}"
                    for k in ("workspace", "data", "models", "logs")}
    env = dict(e.split("=", 1) for e in _opt(opts, "--env"))
    assert env["CAPSULE_MODELS_DIR"] == "/models" and env["CAPSULE_STAGE"] == "train"
    labels = dict(e.split("=", 1) for e in _opt(opts, "--label"))
    assert labels["torchcapsule.job"] == "digits-train" and labels["torchcapsule.project"] == "digits"
    assert cmd[:3] == ["python", "-m", "torchcapsule.launch.torchrun"]  # the image's venv python
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[-3:] == ["train.py", "--epochs", "30"]
    assert not any(a.startswith("--restart") for a in opts)  # ddp retries happen inside torchrun


def test_shm_size_gpus_and_restart_policy(project, monkeypatch):
    spec = job_spec(project, "train", gpus=2)
    argv = render_argv(spec, DockerTarget(ipc_host=False, network="host"), "n", 1000, 1000)
    assert f"--shm-size={2**30}" in argv and "--ipc=host" not in argv
    assert _opt(argv, "--gpus") == ["2"] and "--network=host" in argv
    assert "--hostname=localhost" not in argv  # the host's own name resolves
    from dataclasses import replace

    plain = replace(job_spec(project, "test"), retries=2)
    argv = render_argv(plain, DockerTarget(), "n", 1000, 1000)
    assert "--restart=on-failure:2" in argv
    assert argv[-5:] == ["python", "-m", "pytest", "-q", "tests"]


def test_several_nodes_refused_with_fix(project):
    with pytest.raises(BackendError, match="--nodes 2.*use --nodes 1 or --on slurm/kubernetes"):
        DockerBackend(project).dryrun(job_spec(project, "train", nodes=2))


@pytest.mark.parametrize("req,names,problem", [
    (GpuRequest(), None, None),
    (GpuRequest(count=1), None, "no NVIDIA GPU"),
    (GpuRequest(count=2), ["NVIDIA H100 80GB HBM3"], "only 1 matching"),
    (parse_gpus("A100:1"), ["NVIDIA H100 80GB HBM3"], "no A100 on this machine"),
    (parse_gpus("H100:1"), ["NVIDIA H100 80GB HBM3", "NVIDIA L4"], None),
    (parse_gpus("L4:1"), ["NVIDIA L40S"], "no L4"),  # L4 is not L40S
])
def test_gpu_problem(req, names, problem):
    got = gpu_problem(req, names)
    if problem is None:
        assert got is None
    else:
        assert problem in got and "\n" not in got


def test_state_table_covers_dockers_states():
    assert set(DOCKER_STATES) == {"created", "running", "restarting", "paused", "removing", "exited", "dead"}


@pytest.mark.parametrize("st,cancelled,expect", [
    ({"Status": "created"}, False, (JobState.PENDING, None)),
    ({"Status": "running", "Running": True}, False, (JobState.RUNNING, None)),
    ({"Status": "exited", "ExitCode": 0}, False, (JobState.SUCCEEDED, 0)),
    ({"Status": "exited", "ExitCode": 3}, False, (JobState.FAILED, 3)),
    ({"Status": "exited", "ExitCode": 143}, True, (JobState.CANCELLED, 143)),
    ({"Status": "exited", "ExitCode": 137, "OOMKilled": True}, False, (JobState.FAILED, 137)),
    ({"Status": "exited", "ExitCode": 0, "OOMKilled": True}, False, (JobState.FAILED, None)),
    ({"Status": "dead", "ExitCode": 0}, False, (JobState.FAILED, None)),
])
def test_job_status(st, cancelled, expect):
    info = {"Name": "/digits-train-x", "State": {**st, "StartedAt": "2026-11-27T10:00:00.123456789Z"},
            "Config": {"Labels": {"torchcapsule.job": "digits-train"}}}
    got = job_status(info, "docker:digits-train-x", cancelled=cancelled, log="boom")
    assert (got.state, got.exit_code, got.name) == (*expect, "digits-train")
    assert got.started_at == 1795773600.123456
    if st.get("OOMKilled"):
        assert "out of memory" in got.reason
    if got.state is JobState.FAILED:
        assert got.reason.endswith("\nboom")  # the end of its log


def test_missing_docker_binary_is_one_line_with_fix(project):
    with pytest.raises(BackendError, match=r"not on PATH; install Docker") as e:
        DockerBackend(project, docker="/nonexistent/docker").check_available()
    assert "\n" not in str(e.value)


def test_no_engine_is_one_line_with_fix(project, tmp_path):
    fake = tmp_path / "docker"  # a docker CLI whose engine is down, as the real one reports it
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\n"
                    "echo 'Is the docker daemon running?' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(BackendError, match=r"no Docker engine answers \(Cannot connect.*start dockerd") as e:
        DockerBackend(project, docker=str(fake)).check_available()
    assert "\n" not in str(e.value)


def test_registry_and_dry_run_text_is_the_argv(project):
    backend = get_backend("docker", project=project)
    dr = backend.dryrun(job_spec(project, "train"))
    import shlex

    assert shlex.split(dr.text) == dr.request
