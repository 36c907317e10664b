"""The Docker backend against the real local engine and the example's CPU image (built here with
the real `capsule image build`): 2-rank DDP training as a non-root host user whose files land in
the host's models directory, a failing stage, cancel, logs, dry run, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, run_capsule
from tests.integration.backend_support import copy_example, job_id_in, status, wait_for
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
