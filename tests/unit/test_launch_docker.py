"""Docker backend: the rendered `docker run` argv, GPU refusals and the state table (pure)."""
from __future__ import annotations

import pytest

from tests.conftest import EXAMPLE
from torchcapsule.config import DockerTarget, GpuRequest, load_project, parse_gpus
from torchcapsule.errors import BackendError
from torchcapsule.launch import get_backend
from torchcapsule.launch.api import JobState
from torchcapsule.launch.api import JobStatus
from torchcapsule.launch.docker import (DOCKER_STATES, DockerBackend, NodesRequest, gpu_problem, group_status,
                                        job_status, merge_logs, render_argv, render_node_argvs)
from torchcapsule.launch.failure import failed_rank
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


def _torchrun_opts(cmd: list[str]) -> dict[str, str]:
    return {a: cmd[i + 1] for i, a in enumerate(cmd) if a.startswith("--")}


def test_two_nodes_are_two_containers_of_one_job_on_the_host_network(project):
    spec = job_spec(project, "train", nodes=2)
    argvs = render_node_argvs(spec, DockerTarget(), "digits-train-x", 1234, 567, rdzv_port=41234)
    assert len(argvs) == 2
    cmds, hostnames = [], []
    for i, argv in enumerate(argvs):
        opts, cmd = argv[:argv.index(spec.image)], argv[argv.index(spec.image) + 1:]
        assert _opt(opts, "--name") == [f"digits-train-x-node{i}"]
        labels = dict(e.split("=", 1) for e in _opt(opts, "--label"))
        assert (labels["torchcapsule.group"], labels["torchcapsule.node"]) == ("digits-train-x", str(i))
        assert labels["torchcapsule.job"] == "digits-train"
        # the only network the containers share here; a name of its own per node, each resolving
        # to its own loopback address in every node (c10d tells the nodes apart by name + PID)
        assert "--network=host" in opts and "--hostname=localhost" not in opts
        hostnames.append(next(a.split("=", 1)[1] for a in opts if a.startswith("--hostname=")))
        assert [a for a in opts if a.startswith("--add-host=")] == [
            "--add-host=digits-train-node0:127.77.0.1", "--add-host=digits-train-node1:127.77.0.2"]
        assert _opt(opts, "--user") == ["1234:567"] and "--cpus=2" in opts  # per node, as on one node
        cmds.append(cmd)
    assert hostnames == ["digits-train-node0", "digits-train-node1"]
    # the same torchrun on each node (launch/command.py): N nodes meeting at one c10d rendezvous
    assert cmds[0] == cmds[1] and cmds[0][:3] == ["python", "-m", "torchcapsule.launch.torchrun"]
    opts = _torchrun_opts(cmds[0])
    assert opts["--nnodes"] == "2" and opts["--nproc_per_node"] == "2" and opts["--rdzv_backend"] == "c10d"
    assert opts["--rdzv_endpoint"] == "127.0.0.1:41234" and opts["--rdzv_id"] == "digits-train-x"
    assert opts["--max_restarts"] == "2"  # retries restart every node's ranks, as on one node


def test_two_nodes_each_get_their_own_gpus(project):
    spec = job_spec(project, "train", nodes=2, gpus=2)
    argvs = render_node_argvs(spec, DockerTarget(), "j", 1000, 1000, rdzv_port=1)
    assert [_opt(a, "--gpus") for a in argvs] == [['"device=0,1"'], ['"device=2,3"']]
    h100 = "NVIDIA H100 80GB HBM3"
    assert gpu_problem(GpuRequest(count=2), [h100] * 4, nodes=2) is None
    assert "only 3 matching GPU(s) here; ask for 1 or fewer per node" in gpu_problem(GpuRequest(count=2), [h100] * 3, 2)
    assert "GPUs 0-1 are not all H100" in gpu_problem(parse_gpus("H100:1"), ["NVIDIA L4", h100, h100], nodes=2)


def test_two_nodes_dry_run_is_one_docker_run_per_line(project):
    dr = DockerBackend(project).dryrun(job_spec(project, "train", nodes=2))
    assert isinstance(dr.request, NodesRequest)
    import shlex

    assert [shlex.split(line) for line in dr.text.splitlines()] == dr.request.argvs
    names = [a[a.index("--name") + 1] for a in dr.request.argvs]
    assert names == [f"{dr.request.job}-node0", f"{dr.request.job}-node1"]
    port = int(_torchrun_opts(dr.request.argvs[0])["--rdzv_endpoint"].rsplit(":", 1)[1])
    assert port > 0  # picked free at submit, never a fixed 29500 that another job holds


def test_two_nodes_need_the_host_network(project):
    spec = job_spec(project, "train", nodes=2)
    with pytest.raises(BackendError, match=r"targets.docker.network: mynet: --nodes 2 .*host network") as e:
        render_node_argvs(spec, DockerTarget(network="mynet"), "j", 1, 1, rdzv_port=1)
    assert "\n" not in str(e.value)
    assert render_node_argvs(spec, DockerTarget(network="host"), "j", 1, 1, rdzv_port=1)


def _node(state, code=None, reason=None, finished=None):
    return JobStatus("docker:n", state, code, reason, name="digits-train", started_at=100.0, finished_at=finished)


@pytest.mark.parametrize("nodes,expect", [
    ([_node(JobState.RUNNING), _node(JobState.RUNNING)], (JobState.RUNNING, None)),
    ([_node(JobState.PENDING), _node(JobState.PENDING)], (JobState.PENDING, None)),
    ([_node(JobState.SUCCEEDED, 0, finished=200.0), _node(JobState.RUNNING)], (JobState.RUNNING, None)),
    ([_node(JobState.SUCCEEDED, 0, finished=200.0), _node(JobState.SUCCEEDED, 0, finished=201.0)],
     (JobState.SUCCEEDED, 0)),
    # failure wins at once, while the other node still runs (the backend then stops it)
    ([_node(JobState.RUNNING), _node(JobState.FAILED, 7, "node 1 (j-node1); rank 3 failed", 150.0)],
     (JobState.FAILED, 7)),
    # the first node to fail names the cause; a node torn down after it does not
    ([_node(JobState.FAILED, 143, "node 0 (j-node0); killed", 160.0),
      _node(JobState.FAILED, 7, "node 1 (j-node1); rank 3 failed", 150.0)], (JobState.FAILED, 7)),
    ([_node(JobState.CANCELLED, 143, "cancelled", 150.0), _node(JobState.CANCELLED, 143, "cancelled", 151.0)],
     (JobState.CANCELLED, 143)),
    ([_node(JobState.CANCELLED, 143, "cancelled", 150.0), _node(JobState.RUNNING)], (JobState.RUNNING, None)),
])
def test_group_status_is_the_worst_nodes(nodes, expect):
    st = group_status("docker:j", nodes)
    assert (st.state, st.exit_code, st.job_id) == (*expect, "docker:j")
    assert st.started_at == 100.0
    if st.state is JobState.FAILED:
        assert st.reason.startswith("node 1 (j-node1)") and st.finished_at == 150.0
    if st.state is JobState.SUCCEEDED:
        assert st.finished_at == 201.0


def test_failed_node_is_named_in_its_reason():
    info = {"Name": "/j-node1", "State": {"Status": "exited", "ExitCode": 1},
            "Config": {"Labels": {"torchcapsule.job": "digits-train", "torchcapsule.node": "1"}}}
    log = ("Root Cause (first observed failure):\n[0]:\n  host      : digits-train-node1\n"
           "  rank      : 3 (local_rank: 1)\n  exitcode  : 7 (pid: 12)\n")
    from torchcapsule.launch.docker import node_label

    st = job_status(info, "docker:j", cancelled=False, log=log, node=node_label(info))
    assert (st.state, st.exit_code) == (JobState.FAILED, 7)
    assert st.reason.startswith("node 1 (j-node1); rank 3 failed with exit code 7 on digits-train-node1")


def test_merged_log_is_in_time_order_with_node_prefixes():
    node0 = ("2026-12-02T17:00:00.5Z [rank0]:rank 0/4 ready\n\n"
             "2026-12-02T17:00:02.000000001Z [rank0]:world_size=4\n")
    node1 = "2026-12-02T17:00:00.25Z [rank1]:rank 3/4 ready\n2026-12-02T17:00:01Z   exitcode  : 7 (pid: 9)\n"
    merged = merge_logs([node0, node1])
    assert merged == ["1: [rank1]:rank 3/4 ready", "0: [rank0]:rank 0/4 ready", "1:   exitcode  : 7 (pid: 9)",
                      "0: [rank0]:world_size=4"]
    assert failed_rank("1:   rank      : 3 (local_rank: 1)\n" + merged[2]) == (3, 7, None)  # srun's label form


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
