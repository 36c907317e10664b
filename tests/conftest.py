"""Shared fixtures. `real_part` is how an integration test asks for a real component:
outside CI a missing part skips the test (the reason is printed with -ra); under CI=true
it fails, so a missing install step can never hide behind a skip."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Tests press Ctrl-C on the commands they start. A suite started in the background by a
# non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and an ignored signal stays
# ignored across exec, so those commands would never see it. A handler here is reset to the default
# in every child at exec, where Python turns it into KeyboardInterrupt as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_MLFLOW_ENV = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak():
    """MLflow's set_tracking_uri also writes $MLFLOW_TRACKING_URI into os.environ: an in-process
    test against one store (a server it then stops) must not point every later test at it."""
    yield
    for k, v in _MLFLOW_ENV.items():  # as the session began (a module fixture may have leaked too)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def missing_part(reason: str) -> None:
    """Fail under CI, skip elsewhere, with the reason either way."""
    if IN_CI:
        pytest.fail(f"real part missing in CI: {reason}", pytrace=False)
    pytest.skip(f"real part missing (outside CI): {reason}")


def require_command(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_part(f"`{name}` not on PATH; {hint}")
    return path


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A running Docker engine (scripts/start-services.sh starts dockerd)."""
    docker = require_command("docker", "run scripts/install-system.sh")
    r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if r.returncode != 0:
        missing_part("no Docker engine answers `docker info`; run scripts/start-services.sh")
    return r.stdout.strip()


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running single-node Slurm cluster (scripts/start-services.sh)."""
    require_command("sbatch", "run scripts/install-system.sh")
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        missing_part("slurmctld/slurmd not answering `sinfo`; run scripts/start-services.sh")


MULTINODE_CONF = "/etc/slurm-mn/slurm.conf"


@pytest.fixture(scope="session")
def slurm_multinode() -> dict[str, str]:
    """The two-node Slurm cluster (scripts/slurm-multinode.sh, started by start-services.sh):
    returns the environment that selects it (SLURM_CONF)."""
    require_command("sbatch", "run scripts/install-system.sh")
    env = {**os.environ, "SLURM_CONF": MULTINODE_CONF}
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env)
    up = [ln for ln in r.stdout.splitlines() if ln.split()[-1].rstrip("*") in ("idle", "mixed", "allocated", "completing")]
    if r.returncode != 0 or len(up) < 2:
        missing_part(f"the multi-node Slurm cluster ({MULTINODE_CONF}) has fewer than 2 nodes up "
                     f"({r.stdout.strip() or r.stderr.strip()}); run scripts/start-services.sh")
    return {"SLURM_CONF": MULTINODE_CONF}


@pytest.fixture(scope="session")
def mlflow_installed() -> None:
    """MLflow importable here (the registry and tracking tests use the real store)."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")


def write_pushed(project_dir: Path, flavor: str, registry: str = "registry.example/acme") -> str:
    """Record a push of the project's `flavor` image (as `capsule image push` does) without a
    registry, for tests of what consumes the record; the local image id is used when there is one,
    so the record is not stale. Returns the pinned reference."""
    from torchcapsule.config import load_project
    from torchcapsule.image import push as p
    from torchcapsule.image.tags import project_tag

    project = load_project(project_dir / "capsule.yaml")
    tag = project_tag(project, flavor=flavor)
    digest = "sha256:" + "5e" * 32
    pinned = f"{registry}/{tag.split(':')[0]}@{digest}"
    p.write_record(project_dir, flavor, p.Pushed(pinned=pinned, digest=digest, tags=[f"{registry}/{tag}"],
                                                 image_id=p._local_image_id(tag) or "sha256:none"))
    return pinned


def run_capsule(*args: str, cwd: Path | str | None = None, env: dict | None = None,
                timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `capsule` CLI in a subprocess (as a user would)."""
    cmd = [sys.executable, "-m", "torchcapsule.cli.main", *args]
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"capsule {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r
