"""The dev box's root boundary, attacked for real (issue 11; docs/image.md, "Threat model").

The attacker is the image user: an SSH login with the real OpenSSH client into a dev box that the
real `capsule dev` started on the real Docker engine, from the digits jupyter-ssh image built by
this checkout. Each attack from the report is replayed and must fail: health-check injection,
links planted for the entrypoint to follow at `docker restart` (also for a container started as
root), a setuid-root file in the workspace, root spelled as HOST_UID; and the image is checked for
setuid files, a root default user, weak sshd algorithms (ssh-audit) and host keys lost on re-create.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, missing_part, run_capsule
from tests.integration.image_fixtures import built_image_id, docker, inspect
from torchcapsule._util import free_port
from torchcapsule.image.render import SETUID_ALLOWED

pytestmark = pytest.mark.integration
UID, GID = 4321, 4322  # the host user the dev box runs as (the tests run as root)





@pytest.fixture(scope="module")
def dev_image(docker_engine) -> str:
    return built_image_id("jupyter-ssh")


@pytest.fixture(scope="module")
def slim_image(docker_engine) -> str:
    return built_image_id("slim")


def _wait(what: str, ok, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout} s")


class Box:
    """A dev box started by `capsule dev --read-only` (host network, 127.0.0.1, unique ports)."""

    def __init__(self, image: str, project: Path, key: Path, name: str):
        self.image, self.project, self.key, self.name = image, project, key, name
        self.jupyter_port, self.ssh_port = free_port(), free_port()

    def start(self, jupyter: bool = True) -> dict:
        r = run_capsule("dev", "-f", str(self.project), "--image", self.image, "--name", self.name,
                        "--network", "host", "--jupyter-port", str(self.jupyter_port),
                        "--ssh-port", str(self.ssh_port), "--key", f"{self.key}.pub", "--uid", str(UID),
                        "--gid", str(GID), "--no-gpus", "--read-only", "--json", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        self.wait_ready(jupyter)
        return json.loads(r.stdout)

    def wait_ready(self, jupyter: bool = False) -> None:
        """sshd answers (then the entrypoint has written the keys and, just after, the token);
        with `jupyter`, Jupyter's API answers too (a minute or more on a loaded machine)."""
        import urllib.request

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.jupyter_port}/api", timeout=5)
                return True
            except OSError:
                return False

        _wait("ssh login", lambda: self.ssh("true").returncode == 0, timeout=300)
        _wait("the token written", lambda: self.ssh("test -f /run/capsule/jupyter_token").returncode == 0)
        if jupyter:
            _wait("Jupyter answering", answers, timeout=600)

    def ssh(self, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
             "-o", "LogLevel=ERROR", "mluser@127.0.0.1", cmd],
            capture_output=True, text=True, timeout=timeout)

    def host_key(self) -> str:
        r = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(self.ssh_port), "127.0.0.1"],
                           capture_output=True, text=True, timeout=30)
        lines = [ln for ln in r.stdout.splitlines() if "ssh-ed25519" in ln]
        assert lines, r.stderr
        return lines[0].split()[-1]


@pytest.fixture(scope="module")
def box(dev_image, tmp_path_factory):
    if shutil.which("ssh") is None or shutil.which("ssh-keyscan") is None:
        missing_part("the OpenSSH client is not installed; run scripts/install-system.sh")
    project = tmp_path_factory.mktemp("sec") / "proj"
    project.mkdir()
    shutil.copy(EXAMPLE / "capsule.yaml", project / "capsule.yaml")
    os.chown(project, UID, GID)  # data/, models/, logs/ are missing: `capsule dev` makes them
    key = project.parent / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    b = Box(dev_image, project, key, f"capsule-test-sec-{os.getpid()}")
    docker("rm", "-f", b.name, check=False)
    try:
        b.start(jupyter=True)
        yield b
    finally:
        docker("rm", "-f", b.name, check=False)


# -- the image -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["jupyter-ssh", "slim"])
def test_image_has_no_setuid_or_setgid_file_and_a_non_root_user(flavor, docker_engine):
    image = built_image_id(flavor)
    r = docker("run", "--rm", "--user", "0", "--entrypoint", "find", image, "/", "-xdev", "-type", "f", "-perm", "/6000",
               timeout=300)
    assert set(r.stdout.split()) <= set(SETUID_ALLOWED), r.stdout
    assert inspect(image, "{{.Config.User}}") == "1000:1000"
    # `docker run` and `docker exec` without --user are the image user, not root
    assert docker("run", "--rm", image, "id", "-u").stdout.strip() == "1000"


@pytest.mark.parametrize("value", ["0", "00", "+0", "-0", "0x0", " 0"])
def test_root_start_refuses_host_uid_zero_in_every_spelling(dev_image, value):
    for env in ([f"HOST_UID={value}"], ["HOST_UID=4321", f"HOST_GID={value}"]):
        args = [a for e in env for a in ("-e", e)]
        r = docker("run", "--rm", "--user", "0", *args, dev_image, "id", "-u", check=False)
        assert r.returncode == 2 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"capsule: error: {env[-1]} is "), r.stderr


def test_root_start_becomes_the_numeric_host_uid(dev_image):
    r = docker("run", "--rm", "--user", "0", "-e", "HOST_UID=04321", "-e", "HOST_GID=4322", dev_image,
               "sh", "-c", "id -u; id -g; id -G; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status")
    out = r.stdout.split()
    assert out[:3] == ["4321", "4322", "4322"]
    assert out[out.index("CapEff:") + 1] == "0000000000000000" and out[out.index("NoNewPrivs:") + 1] == "1"


def test_slim_image_runs_read_only(slim_image):
    r = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{GID}", slim_image,
               "python", "-c", "import torch, pathlib; pathlib.Path('/tmp/x').write_text('ok'); "
               "print(torch.ones(3).sum().item())", timeout=300)
    assert r.stdout.strip() == "3.0", r.stderr
    r = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", slim_image, "touch", "/home/mluser/x", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr


# -- the running dev box ---------------------------------------------------------------------------------
def test_dev_box_holds_no_privilege(box):
    host = json.loads(docker("inspect", box.name).stdout)[0]["HostConfig"]
    assert "no-new-privileges" in host["SecurityOpt"] and host["CapDrop"] == ["ALL"]  # dockerd may add label=disable
    assert not host.get("CapAdd") and not host["Privileged"] and host["ReadonlyRootfs"] is True
    assert inspect(box.name, "{{.Config.User}}") == f"{UID}:{GID}"
    # no process of the container is root: not tini, not sshd, not Jupyter, not the session
    r = box.ssh("ps -eo uid=,comm= | sort -u; grep -E 'CapEff|CapBnd|NoNewPrivs' /proc/self/status")
    assert r.returncode == 0, r.stderr
    procs = [ln.split() for ln in r.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert {"tini", "sshd"} <= {c for _, c in procs} and {u for u, _ in procs} == {str(UID)}, r.stdout
    assert "CapEff:\t0000000000000000" in r.stdout and "CapBnd:\t0000000000000000" in r.stdout
    assert "NoNewPrivs:\t1" in r.stdout
    # `docker exec` is the user too
    assert docker("exec", box.name, "id", "-u").stdout.strip() == str(UID)


def test_missing_volumes_are_created_owned_by_the_requested_ids(box):
    for d in ("data", "models", "logs"):
        st = (box.project / d).stat()
        assert (st.st_uid, st.st_gid) == (UID, GID), d
    r = box.ssh("id -un; id -u; id -g; touch /data/a /models/b /logs/c /workspace/d && echo wrote")
    assert r.stdout.split() == ["mluser", str(UID), str(GID), "wrote"], r.stderr
    assert (box.project / "logs" / "c").stat().st_gid == GID


def test_read_only_dev_box_writes_only_where_it_may(box):
    # /var/tmp is world-writable: only the read-only root filesystem refuses it
    r = box.ssh("touch /var/tmp/x 2>&1; touch /tmp/x ~/x /run/capsule/x /workspace/x && echo writable")
    assert "Read-only file system" in r.stdout and r.stdout.strip().endswith("writable"), r.stdout


def test_setuid_root_file_in_the_workspace_gives_no_root(box):
    # A setuid-root bash lands in the workspace (as the report's chain made one): the user runs it.
    assert box.ssh("cp /bin/bash /workspace/rootbash").returncode == 0
    rb = box.project / "rootbash"
    os.chown(rb, 0, 0)
    os.chmod(rb, 0o4755)
    try:
        r = box.ssh("/workspace/rootbash -p -c 'id -u; id -ru; grep CapEff /proc/self/status'")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[:2] == [str(UID), str(UID)] and "CapEff:\t0000000000000000" in r.stdout
    finally:
        rb.unlink()


def test_healthcheck_injection_runs_nothing(box):
    payload = '__import__("os").system("id>/tmp/pwned; cp /bin/bash /tmp/rb; chmod 4755 /tmp/rb")'
    r = box.ssh(f"printf '%s\\n' 'sshd {payload}' 'jupyter 1);{payload}#' > /run/capsule/services && echo planted")
    assert r.stdout.strip() == "planted", r.stderr
    # Docker runs the check as the container's user; run it as root too: still nothing happens.
    for user in (f"{UID}:{GID}", "0"):
        r = docker("exec", "-u", user, box.name, "capsule-entrypoint", "healthcheck", check=False)
        assert r.returncode == 0, r.stderr
    r = docker("exec", "-u", "0", "-e", f"SSH_PORT=22 {payload}", box.name, "capsule-entrypoint", "healthcheck",
               check=False)
    assert r.returncode == 1 and "SSH_PORT=22 __import__" in r.stderr and "not a port number" in r.stderr
    assert box.ssh("ls /tmp/pwned /tmp/rb").returncode != 0
    # ...and Docker's own health check (every 30 s), run after the plant, still passes
    def last_check():
        log = json.loads(inspect(box.name, "{{json .State.Health.Log}}") or "null") or [{}]
        return log[-1]
    before = last_check().get("Start")
    _wait("a health check after the plant", lambda: last_check().get("Start") not in (None, before), timeout=150)
    assert last_check()["ExitCode"] == 0
    assert box.ssh("ls /tmp/pwned /tmp/rb").returncode != 0


def _plant_and_restart(name: str, exec_user: list[str], ready) -> None:
    keys = "/home/mluser/.ssh/authorized_keys"
    plant = (f"rm -f /run/capsule/jupyter_token {keys}"
             " && ln -s /etc/ld.so.preload /run/capsule/jupyter_token"
             f" && ln -s /etc/shadow {keys} && echo planted")
    r = docker("exec", *exec_user, name, "bash", "-c", plant)
    assert r.stdout.strip() == "planted", r.stderr
    shadow = docker("exec", "-u", "0", name, "stat", "-c", "%u:%g %a %s", "/etc/shadow").stdout
    docker("restart", "-t", "10", name, timeout=180)
    ready()
    assert docker("exec", "-u", "0", name, "test", "-e", "/etc/ld.so.preload", check=False).returncode == 1
    assert docker("exec", "-u", "0", name, "stat", "-c", "%u:%g %a %s", "/etc/shadow").stdout == shadow


def test_links_planted_for_the_next_start_are_not_followed(box):
    _plant_and_restart(box.name, [], box.wait_ready)
    r = box.ssh("stat -c '%F %u %a' ~/.ssh/authorized_keys /run/capsule/jupyter_token")
    assert r.stdout.splitlines() == [f"regular file {UID} 600"] * 2, r.stdout + r.stderr


def test_links_planted_in_a_root_started_container_are_not_followed(dev_image, tmp_path):
    """The old path: started as root with HOST_UID and Docker's default capabilities (worst case);
    /run/capsule and the home live in the container's layer, so the links survive the restart."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    jp, sp = free_port(), free_port()
    name = f"capsule-test-sec-root-{os.getpid()}"
    docker("rm", "-f", name, check=False)
    b = Box(dev_image, tmp_path, key, name)
    b.jupyter_port, b.ssh_port = jp, sp
    try:
        docker("run", "-d", "--name", name, "--network", "host", "--user", "0", "-e", f"HOST_UID={UID}",
               "-e", f"HOST_GID={GID}", "-e", f"SSH_PORT={sp}", "-e", "SSH_BIND=127.0.0.1", "-e", f"JUPYTER_PORT={jp}",
               "-e", "JUPYTER_IP=127.0.0.1", "-e", f"SSH_AUTHORIZED_KEYS={Path(f'{key}.pub').read_text()}",
               dev_image, "dev")
        b.wait_ready()
        _plant_and_restart(name, ["-u", f"{UID}:{GID}"], b.wait_ready)
        r = b.ssh("stat -c '%F %u' ~/.ssh/authorized_keys /run/capsule/jupyter_token; ps -eo uid=,comm=")
        lines = r.stdout.splitlines()
        assert lines[:2] == [f"regular file {UID}"] * 2, r.stdout + r.stderr
        # the services run as the user; only tini (PID 1) and Docker's health check (which runs as
        # the container's --user 0 and reads no file) are root here
        procs = [ln.split() for ln in lines[2:]]
        assert {u for u, c in procs if c in ("sshd", "jupyter-lab", "capsule-entrypo")} == {str(UID)}, r.stdout
        assert ["0", "tini"] in procs
    finally:
        docker("rm", "-f", name, check=False)


def test_sshd_has_no_ssh_audit_finding_above_info(box):
    audit = shutil.which("ssh-audit") or str(Path(sys.executable).with_name("ssh-audit"))
    if not Path(audit).exists():
        missing_part("ssh-audit is not installed; pip install -e '.[dev]'")
    r = subprocess.run([audit, "-j", "-p", str(box.ssh_port), "127.0.0.1"], capture_output=True, text=True,
                       timeout=120)
    report = json.loads(r.stdout)
    findings = [(kind, a["algorithm"], level, note)
                for kind in ("kex", "key", "enc", "mac") for a in report[kind]
                for level, notes in a.get("notes", {}).items() if level != "info" for note in notes]
    assert findings == [] and report["cves"] == [] and report["recommendations"] == {}, findings


def test_host_keys_survive_remove_and_re_create(box):
    before = box.host_key()
    docker("rm", "-f", box.name)
    box.start(jupyter=False)
    assert box.host_key() == before
