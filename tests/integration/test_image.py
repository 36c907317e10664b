"""The image, for real: built with the real `capsule image build` on a real Docker engine from the
digits example (CPU wheels, local Debian base), then its containers checked from the outside:
Jupyter's REST API, the OpenSSH client, host keys, file ownership, shutdown and failure modes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, run_capsule
from tests.integration.image_fixtures import (  # noqa: F401  (fixtures)
    BASE_IMAGE, digits_dev_image, digits_slim_image, docker, ensure_base_image, inspect,
)
from torchcapsule._util import free_port

pytestmark = pytest.mark.integration
HOST_UID = 4321





# -- the images ------------------------------------------------------------------------------------
def test_tags_and_labels(digits_slim_image, digits_dev_image):
    assert digits_slim_image == "digits:2.13.0-cpu-py3.11-slim"
    assert digits_dev_image == "digits:2.13.0-cpu-py3.11-jupyter-ssh"
    labels = json.loads(inspect(digits_dev_image, "{{json .Config.Labels}}"))
    assert labels["io.torchcapsule.torch"] == "2.13.0" and labels["io.torchcapsule.cuda"] == "cpu"
    assert labels["io.torchcapsule.python.full"] == "3.11.2"
    assert labels["org.opencontainers.image.title"] == "digits"
    assert labels["org.opencontainers.image.version"] == "2.13.0-cpu-py3.11-jupyter-ssh"
    locks = (EXAMPLE / "capsule.lock").read_text() + (EXAMPLE / "capsule.dev.lock").read_text()
    assert labels["io.torchcapsule.lock.sha256"] == "sha256:" + hashlib.sha256(locks.encode()).hexdigest()
    slim = json.loads(inspect(digits_slim_image, "{{json .Config.Labels}}"))
    assert slim["io.torchcapsule.lock.sha256"] == \
        "sha256:" + hashlib.sha256((EXAMPLE / "capsule.lock").read_bytes()).hexdigest()


def test_slim_is_smaller_and_has_no_jupyter_or_sshd(digits_slim_image, digits_dev_image):
    slim, dev = int(inspect(digits_slim_image, "{{.Size}}")), int(inspect(digits_dev_image, "{{.Size}}"))
    assert slim < dev
    r = docker("run", "--rm", "--network", "host", digits_slim_image, "bash", "-c",
               "command -v sshd jupyter; ls /usr/share/doc | wc -l; find /opt/venv -type d -name tests | wc -l",
               check=False)
    out = r.stdout.split()
    assert "sshd" not in r.stdout and "jupyter" not in r.stdout
    assert out[-1] == "0"


def test_inside_the_image_the_locked_torch_and_capsule_work(digits_slim_image):
    script = ("set -e; python -c 'import torch, numpy, sklearn, safetensors; print(torch.__version__)'; "
              "capsule validate /workspace/capsule.yaml; id -un")
    r = docker("run", "--rm", "--network", "host", "--ipc=host", "-v", f"{EXAMPLE}:/workspace:ro",
               digits_slim_image, "bash", "-c", script, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "2.13.0+cpu"
    assert "ok" in r.stdout and r.stdout.strip().endswith("mluser")


def test_capsule_doctor_runs_inside_the_image(digits_slim_image):
    r = docker("run", "--rm", "--network", "host", "--ipc=host", "-v", f"{EXAMPLE}:/workspace:ro",
               digits_slim_image, "capsule", "doctor", "-f", "/workspace/capsule.yaml", "--json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    summary = report["summary"]
    assert summary["torch"] == "2.13.0+cpu" and summary["torch_matches_pin"] is True
    assert summary["cuda_available"] is False and summary["in_container"] is True
    # a CPU image that pins cuda: cpu is diagnosed as such, and that is fine (exit 0)
    assert [f["id"] for f in report["findings"]][0] == "cpu-only-build"
    assert report["ok"] is True and report["exit_code"] == 0


def test_entrypoint_warns_about_small_shm_and_not_on_cpu_about_gpus(digits_slim_image):
    r = docker("run", "--rm", "--network", "host", "--shm-size=64m", digits_slim_image, "true", check=False)
    assert r.returncode == 0
    assert "/dev/shm is only 64 MiB" in r.stderr and "--ipc=host" in r.stderr
    assert "NVIDIA" not in r.stderr  # a CPU image needs no GPU
    r = docker("run", "--rm", "--network", "host", "--ipc=host", digits_slim_image, "true", check=False)
    assert "WARNING" not in r.stderr


# -- the dev container -----------------------------------------------------------------------------
def _start_dev(image: str, project: Path, key: Path, name: str) -> dict:
    jp, sp = free_port(), free_port()
    r = run_capsule("dev", "-f", str(project), "--image", image, "--name", name, "--network", "host",
                    "--jupyter-port", str(jp), "--ssh-port", str(sp), "--key", f"{key}.pub",
                    "--uid", str(HOST_UID), "--gid", str(HOST_UID), "--no-gpus", "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    info.update(name=name, jupyter_port=jp, ssh_port=sp,
                token=(project / ".capsule" / "dev" / name / "jupyter_token").read_text().strip())
    return info


def _wait_jupyter(port: int, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"Jupyter did not answer on port {port} within {timeout} s")


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def dev_env(digits_dev_image, tmp_path_factory):
    """Two dev containers from one image, started by `capsule dev` (host network, 127.0.0.1)."""
    if shutil.which("ssh") is None:
        from tests.conftest import missing_part

        missing_part("the OpenSSH client is not installed; run scripts/install-system.sh")
    tmp = tmp_path_factory.mktemp("dev")
    project = tmp / "proj"
    project.mkdir()
    shutil.copy(EXAMPLE / "capsule.yaml", project / "capsule.yaml")
    for d in ("data", "models", "logs"):
        (project / d).mkdir()
    # The host user owning the project: the container user is mapped onto it.
    for p in (project, *[project / d for d in ("data", "models", "logs")]):
        os.chown(p, HOST_UID, HOST_UID)
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    suffix = str(os.getpid())
    names = [f"capsule-test-dev-a-{suffix}", f"capsule-test-dev-b-{suffix}"]
    for n in names:
        docker("rm", "-f", n, check=False)
    a = b = None
    try:
        a = _start_dev(digits_dev_image, project, key, names[0])
        b = _start_dev(digits_dev_image, project, key, names[1])
        for c in (a, b):
            _wait_port(c["ssh_port"])
            _wait_jupyter(c["jupyter_port"])
        yield {"a": a, "b": b, "key": key, "project": project}
    finally:
        for n in names:
            docker("rm", "-f", n, check=False)


def _ssh(env, user: str, *cmd: str, extra=(), port=None):
    return subprocess.run(
        ["ssh", "-i", str(env["key"]), "-p", str(port or env["a"]["ssh_port"]), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
         *extra, f"{user}@127.0.0.1", *cmd],
        capture_output=True, text=True, timeout=60)


def test_jupyter_refuses_requests_without_the_token(dev_env):
    import httpx

    a = dev_env["a"]
    url = f"http://127.0.0.1:{a['jupyter_port']}/api/contents"
    assert httpx.get(url, timeout=10).status_code == 403
    assert httpx.get(url, headers={"Authorization": "token wrong"}, timeout=10).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"token {a['token']}"}, timeout=10).status_code == 200
    assert a["jupyter_url"].endswith(f":{a['jupyter_port']}/lab?token={a['token']}")


def test_the_token_never_appears_in_logs_or_inspect(dev_env):
    a = dev_env["a"]
    logs = docker("logs", a["name"]).stdout + docker("logs", a["name"]).stderr
    assert "Jupyter" in logs or "jupyter" in logs.lower()
    assert a["token"] not in logs
    assert a["token"] not in docker("inspect", a["name"]).stdout
    mode = docker("exec", a["name"], "stat", "-c", "%a %u", "/run/capsule/jupyter_token").stdout.split()
    assert mode == ["600", str(HOST_UID)]


def test_ssh_logs_in_as_mluser_with_the_injected_key(dev_env):
    r = _ssh(dev_env, "mluser", "id -un; id -u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["mluser", str(HOST_UID)]


def test_root_and_password_logins_are_refused(dev_env):
    a = dev_env["a"]
    # Even with the right key in root's authorized_keys, root may not log in.
    pub = Path(f"{dev_env['key']}.pub").read_text().strip()
    docker("exec", "-u", "0", a["name"], "sh", "-c",
           'mkdir -p /root/.ssh && printf "%s\n" "$1" > /root/.ssh/authorized_keys && chmod 700 /root/.ssh', "_", pub)
    r = _ssh(dev_env, "root", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr
    r = _ssh(dev_env, "mluser", "true", extra=("-o", "PubkeyAuthentication=no",
                                               "-o", "PreferredAuthentications=password,keyboard-interactive"))
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr
    cfg = _ssh(dev_env, "mluser", "/usr/sbin/sshd -T -h ~/.ssh/host_keys/ssh_host_ed25519_key").stdout.lower()
    assert "permitrootlogin no" in cfg and "passwordauthentication no" in cfg


def test_two_containers_have_different_host_keys(dev_env):
    keys = []
    for c in (dev_env["a"], dev_env["b"]):
        r = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(c["ssh_port"]), "127.0.0.1"],
                           capture_output=True, text=True, timeout=30)
        line = [ln for ln in r.stdout.splitlines() if "ssh-ed25519" in ln]
        assert line, r.stderr
        keys.append(line[0].split()[-1])
    assert keys[0] != keys[1]
    # ...and the image itself carries none.
    r = docker("run", "--rm", "--entrypoint", "sh", dev_env["a"]["image"] if "image" in dev_env["a"] else
               inspect(dev_env["a"]["name"], "{{.Config.Image}}"), "-c", "ls /etc/ssh/ssh_host_* 2>/dev/null | wc -l")
    assert r.stdout.strip() == "0"


def test_files_written_to_workspace_belong_to_the_host_user(dev_env):
    r = _ssh(dev_env, "mluser", "echo hi > /workspace/from-ssh.txt && touch /logs/from-ssh.log")
    assert r.returncode == 0, r.stderr
    project = dev_env["project"]
    assert (project / "from-ssh.txt").stat().st_uid == HOST_UID
    assert (project / "logs" / "from-ssh.log").stat().st_uid == HOST_UID


def test_healthcheck_and_clean_shutdown_on_sigterm(dev_env):
    b = dev_env["b"]
    assert docker("exec", b["name"], "capsule-entrypoint", "healthcheck", check=False).returncode == 0
    t0 = time.monotonic()
    docker("stop", "-t", "30", b["name"])
    assert time.monotonic() - t0 < 20
    assert inspect(b["name"], "{{.State.ExitCode}}") == "0"


# -- failures ----------------------------------------------------------------------------------------
def test_unpullable_base_is_one_line(tmp_path, docker_engine):
    r = run_capsule("image", "build", "-f", str(EXAMPLE), "--flavor", "slim", "--base", "local/no-such-base:1",
                    timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --base: base image 'local/no-such-base:1' is not here "
                                                   "and cannot be pulled")


def test_base_with_another_python_is_refused(docker_engine):
    ensure_base_image()
    r = run_capsule("image", "build", "-f", str(EXAMPLE), "--flavor", "slim", "--python", "3.12",
                    "--base", BASE_IMAGE, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: --base: base image '{BASE_IMAGE}' has Python 3.11.2 but the image asks for Python 3.12; pass "
        "--base with an image whose python3 is 3.12 or set --python 3.11"]


def test_missing_engine_is_one_line(tmp_path):
    r = run_capsule("image", "build", "-f", str(EXAMPLE), "--flavor", "slim", "--base", BASE_IMAGE,
                    env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"}, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Docker engine answers") and "start" in lines[0]


def test_failed_build_leaves_the_final_tag_untouched(tmp_path, digits_slim_image):
    # A project whose runtime stage fails (an apt package that does not exist); its final tag
    # already points at a good image, which must survive the failed build.
    proj = tmp_path / "broken"
    proj.mkdir()
    text = (EXAMPLE / "capsule.yaml").read_text().replace("name: digits", "name: broken", 1)
    text = text.replace("  pip: [numpy", "  apt: [capsule-no-such-package]\n  pip: [numpy", 1)
    (proj / "capsule.yaml").write_text(text)
    for lockf in ("capsule.lock", "capsule.dev.lock"):
        shutil.copy(EXAMPLE / lockf, proj / lockf)
    (proj / ".capsule").mkdir()
    (proj / ".capsule" / "wheelhouse").symlink_to(EXAMPLE / ".capsule" / "wheelhouse")
    final = "broken:2.13.0-cpu-py3.11-slim"
    docker("tag", digits_slim_image, final)
    good = inspect(final, "{{.Id}}")
    try:
        r = run_capsule("image", "build", "-f", str(proj), "--flavor", "slim", "--base", BASE_IMAGE, timeout=900)
        assert r.returncode == 1, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: docker build failed at Step")
        assert "capsule-no-such-package" in lines[0] and f"{final} was not tagged" in lines[0]
        assert inspect(final, "{{.Id}}") == good
        # ...and no container of the failed step is left behind (--force-rm).
        left = docker("ps", "-a", "--filter", "status=exited", "--format", "{{.Command}}", "--no-trunc").stdout
        assert "capsule-no-such-package" not in left
    finally:
        docker("rmi", final, check=False)


def test_generated_token_is_in_a_0600_file_and_not_in_logs(digits_dev_image):
    import httpx

    port, name = free_port(), f"capsule-test-token-{os.getpid()}"
    docker("rm", "-f", name, check=False)
    try:
        docker("run", "-d", "--name", name, "--network", "host", "--ipc=host", "-e", f"JUPYTER_PORT={port}",
               "-e", "JUPYTER_IP=127.0.0.1", digits_dev_image, "jupyter")
        _wait_jupyter(port)
        token = docker("exec", name, "cat", "/run/capsule/jupyter_token").stdout.strip()
        assert len(token) == 48
        assert docker("exec", name, "stat", "-c", "%a", "/run/capsule/jupyter_token").stdout.strip() == "600"
        url = f"http://127.0.0.1:{port}/api/contents"
        assert httpx.get(url, timeout=10).status_code == 403
        assert httpx.get(url, params={"token": token}, timeout=10).status_code == 200
        logs = docker("logs", name)
        assert token not in logs.stdout + logs.stderr and "token=..." in logs.stdout + logs.stderr
    finally:
        docker("rm", "-f", name, check=False)
