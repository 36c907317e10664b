"""The Docker backend against the real local engine and the example's CPU image (built here with
the real `capsule image build`): 2-rank DDP training as a non-root host user whose files land in
the host's models directory, a failing stage, cancel, logs, dry run, bad input; and `--nodes 2`
(two containers of one job meeting over the host network): 2 x 2 training, one node's failing
rank, cancel."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, run_capsule
from tests.integration.backend_support import add_node_stages, copy_example, job_id_in, status, wait_for
from tests.integration.image_fixtures import build_digits_image

REGISTRY = "capsule-backends-test"  # our own tag: other sessions rebuild the shared digits tags
HOST_UID = HOST_GID = 23456  # a non-root "host user": the test itself runs as root in CI


@pytest.fixture(scope="module")
def image(docker_engine) -> str:
    """The example's slim CPU image, built with the real `capsule image build` (the image tests'
    fixture, built once per session), retagged under our own name right away."""
    from torchcapsule.config import load_project
    from torchcapsule.image.tags import tag_for

    built = build_digits_image("slim")
    image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", built],
                              capture_output=True, text=True, check=True).stdout.strip()
    example = load_project(EXAMPLE)
    tag = tag_for(example.name, example.image.model_copy(update={"registry": REGISTRY, "flavor": "slim"}))
    subprocess.run(["docker", "tag", image_id, tag], check=True)
    return tag


@pytest.fixture
def project(image) -> Path:
    dest = copy_example("capsule-docker-", image_registry=REGISTRY, flavor="slim")
    for p in [dest, *dest.rglob("*")]:  # the host user's project
        os.chown(p, HOST_UID, HOST_GID)
    yield dest
    r = subprocess.run(["docker", "ps", "-aq", "--filter", "label=torchcapsule.project=digits",
                        "--filter", f"volume={dest}"], capture_output=True, text=True)
    if r.stdout.split():
        subprocess.run(["docker", "rm", "-f", *r.stdout.split()], capture_output=True)
    shutil.rmtree(dest.parent, ignore_errors=True)


def test_train_two_ranks_in_the_image_files_owned_by_the_host_user(project):
    """The host user is a non-root uid here (the test runs as root, and this machine's interpreter
    is not executable by other users, so the uid is given to the backend rather than by setuid)."""
    from torchcapsule.config import load_project
    from torchcapsule.launch.docker import DockerBackend
    from torchcapsule.launch.spec import job_spec

    p = load_project(project)
    backend = DockerBackend(p, uid=HOST_UID, gid=HOST_GID)
    job_id = backend.submit(job_spec(p, "train"))
    st = backend.wait(job_id, poll_s=1, timeout_s=300)
    log = "\n".join(backend.logs(job_id))
    assert (st.state.value, st.exit_code) == ("SUCCEEDED", 0), log[-3000:]
    assert "[rank0]:" in log and "[rank1]:" in log
    model_dir = project / "models" / "digits"
    for name in ("model.safetensors", "model.py", "meta.json"):
        fst = (model_dir / name).stat()
        assert (fst.st_uid, fst.st_gid) == (HOST_UID, HOST_GID), name
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["params"]["world_size"] == 2 and meta["metrics"]["accuracy"] >= 0.9
    info = json.loads(subprocess.run(["docker", "inspect", job_id.split(":", 1)[1]], capture_output=True,
                                     text=True, check=True).stdout)[0]
    assert info["Config"]["User"] == f"{HOST_UID}:{HOST_GID}" and info["HostConfig"]["IpcMode"] == "host"
    assert info["Config"]["Labels"]["torchcapsule.stage"] == "train"
    cli = json.loads(run_capsule("jobs", "status", job_id, "--json", cwd=project, check=True).stdout)
    assert (cli["state"], cli["exit_code"]) == ("SUCCEEDED", 0)
    listed = json.loads(run_capsule("jobs", "list", "--on", "docker", "--json", cwd=project, check=True).stdout)
    assert job_id in [j["job_id"] for j in listed["jobs"]]


def test_failing_stage_is_failed_with_its_exit_code(project):
    r = run_capsule("run", "fail", "--on", "docker", cwd=project, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    st = status(job_id_in(r.stderr, "docker"), project)
    assert (st["state"], st["exit_code"]) == ("FAILED", 3) and "bad input on purpose" in st["reason"]


def test_cancel_and_logs(project):
    r = run_capsule("run", "sleep", "--on", "docker", "--detach", cwd=project)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert wait_for(job_id, project, {"RUNNING"}, timeout=60)["state"] == "RUNNING"
    env = {"HOME": str(project.parent)}  # the cancel marker lives in the user's state dir
    run_capsule("jobs", "cancel", job_id, cwd=project, check=True, env=env)
    st = wait_for(job_id, project, {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=60, env=env)
    assert st["state"] == "CANCELLED"
    r = run_capsule("jobs", "logs", job_id, cwd=project, check=True)
    assert r.returncode == 0


def test_dry_run_prints_the_docker_argv(project, image):
    r = run_capsule("run", "train", "--on", "docker", "--dry-run", cwd=project, check=True)
    import shlex

    argv = shlex.split(r.stdout)
    assert argv[:3] == ["docker", "run", "--detach"] and image in argv
    assert argv[argv.index(image) + 1:][:3] == ["python", "-m", "torchcapsule.launch.torchrun"]


def test_bad_input_is_one_line_with_the_fix(project):
    r = run_capsule("jobs", "status", "docker:no-such-container-xyz", cwd=project)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "capsule jobs list" in r.stderr
    if shutil.which("nvidia-smi") is None:
        r = run_capsule("run", "train", "--on", "docker", "--gpus", "1", cwd=project)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no NVIDIA GPU" in r.stderr
    text = (project / "capsule.yaml").read_text()
    (project / "capsule.yaml").write_text(text.replace(f"registry: {REGISTRY}", "registry: not-built-here"))
    r = run_capsule("run", "train", "--on", "docker", cwd=project)
    assert r.returncode == 1 and "build it with `capsule image build`" in r.stderr
    r = run_capsule("run", "train", "--on", "docker", cwd=project, env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert r.returncode == 1 and "start dockerd" in r.stderr and r.stderr.count("\n") == 1


@pytest.fixture
def nodes_project(project) -> Path:
    """--nodes 2: two containers on this machine, one job (node 1's local rank 1 fails in nodefail)."""
    return add_node_stages(project, fail_host="digits-nodefail-node1")


def _containers(job_id: str) -> list[dict]:
    group = job_id.split(":", 1)[1]
    names = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=torchcapsule.group={group}"],
                           capture_output=True, text=True, check=True).stdout.split()
    return json.loads(subprocess.run(["docker", "inspect", *names], capture_output=True, text=True,
                                     check=True).stdout) if names else []


def test_train_on_two_nodes_two_ranks_each(project):
    from torchcapsule.config import load_project
    from torchcapsule.launch.docker import DockerBackend
    from torchcapsule.launch.spec import job_spec

    p = load_project(project)
    backend = DockerBackend(p, uid=HOST_UID, gid=HOST_GID)
    job_id = backend.submit(job_spec(p, "train", nodes=2))
    st = backend.wait(job_id, poll_s=1, timeout_s=900)
    assert (st.state.value, st.exit_code) == ("SUCCEEDED", 0), "\n".join(backend.logs(job_id))[-3000:]
    # one job, two containers, one per node, on the host network under their own names
    infos = sorted(_containers(job_id), key=lambda i: i["Config"]["Labels"]["torchcapsule.node"])
    assert [i["Config"]["Labels"]["torchcapsule.node"] for i in infos] == ["0", "1"]
    assert [i["Config"]["Hostname"] for i in infos] == ["digits-train-node0", "digits-train-node1"]
    assert {i["HostConfig"]["NetworkMode"] for i in infos} == {"host"}
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["params"]["world_size"] == 4 and meta["metrics"]["accuracy"] >= 0.9
    logs = run_capsule("jobs", "logs", job_id, cwd=project, check=True).stdout
    # ranks 0..3 of one world, two per node, each line led by its node
    ready = set(re.findall(r"(?m)^(\d): \[rank\d\]:rank (\d)/4 ready", logs))
    assert {rank for _, rank in ready} == {"0", "1", "2", "3"}, logs[:3000]
    assert {node for node, _ in ready} == {"0", "1"}
    st = status(job_id, project)
    assert (st["state"], st["exit_code"]) == ("SUCCEEDED", 0)
    listed = json.loads(run_capsule("jobs", "list", "--on", "docker", "--json", cwd=project, check=True).stdout)
    assert [j["job_id"] for j in listed["jobs"]].count(job_id) == 1


def test_one_nodes_failing_rank_fails_the_job_and_stops_the_other_node(nodes_project):
    r = run_capsule("run", "nodefail", "--on", "docker", cwd=nodes_project, timeout=600)
    assert r.returncode == 7, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = job_id_in(r.stderr, "docker")
    st = status(job_id, nodes_project)
    assert (st["state"], st["exit_code"]) == ("FAILED", 7), st
    assert st["reason"].startswith(f"node 1 ({job_id.split(':')[1]}-node1)"), st["reason"]
    assert "rank 3 failed with exit code 7 on digits-nodefail-node1" in st["reason"], st["reason"]
    # the first node's ranks waited on nothing the failure could break: the backend stopped them
    assert {i["State"]["Status"] for i in _containers(job_id)} == {"exited"}


def test_cancel_stops_both_nodes(nodes_project):
    r = run_capsule("run", "nodesleep", "--on", "docker", "--detach", cwd=nodes_project, check=True)
    job_id = r.stdout.strip()
    marks = nodes_project / "logs" / "ranks"
    deadline = time.monotonic() + 300
    while len(list(marks.glob("rank*")) if marks.is_dir() else []) < 4:  # every rank of both nodes started
        assert time.monotonic() < deadline, status(job_id, nodes_project)
        time.sleep(0.5)
    assert {f.read_text().split()[0] for f in marks.glob("rank*")} == {"digits-nodesleep-node0", "digits-nodesleep-node1"}
    env = {"HOME": str(nodes_project.parent)}  # the cancel marker lives in the user's state dir
    run_capsule("jobs", "cancel", job_id, cwd=nodes_project, check=True, env=env)
    st = wait_for(job_id, nodes_project, {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=120, env=env)
    assert st["state"] == "CANCELLED", st
    infos = _containers(job_id)
    assert len(infos) == 2 and {i["State"]["Status"] for i in infos} == {"exited"}


def test_cancelled_two_node_training_resumes_from_its_checkpoint(project, monkeypatch):
    """As on one node: the ranks of both nodes checkpoint on SIGTERM, and a rerun resumes there."""
    from torchcapsule.config import load_project
    from torchcapsule.launch.docker import DockerBackend
    from torchcapsule.launch.spec import job_spec

    monkeypatch.setenv("XDG_STATE_HOME", str(project.parent / "state"))  # the cancel markers
    text = (project / "capsule.yaml").read_text()
    (project / "capsule.yaml").write_text(text.replace("train.py --epochs 30", "train.py --epochs 60"))
    p = load_project(project)
    backend = DockerBackend(p, uid=HOST_UID, gid=HOST_GID)
    job_id = backend.submit(job_spec(p, "train", nodes=2))
    deadline = time.monotonic() + 600
    while not any(":epoch 5/" in line for line in backend.logs(job_id)):
        assert time.monotonic() < deadline and not backend.status(job_id).state.terminal, \
            "\n".join(backend.logs(job_id))[-3000:]
        time.sleep(1)
    backend.cancel(job_id)
    st = backend.wait(job_id, poll_s=1, timeout_s=180)
    log = "\n".join(backend.logs(job_id))
    assert st.state.value == "CANCELLED", log[-3000:]
    saved = re.search(r"preempted at step (\d+): checkpoint saved", log)
    assert saved, log[-3000:]
    rerun = backend.submit(job_spec(p, "train", nodes=2))
    st = backend.wait(rerun, poll_s=1, timeout_s=900)
    log = "\n".join(backend.logs(rerun))
    assert (st.state.value, st.exit_code) == ("SUCCEEDED", 0), log[-3000:]
    assert f"resumed from step {saved.group(1)}" in log, log[:3000]
    meta = json.loads((project / "models" / "digits" / "meta.json").read_text())
    assert meta["params"]["world_size"] == 4 and meta["metrics"]["accuracy"] >= 0.9
