"""Provenance recorded with each registered version: git commit, image tag and digest, lock hash and a
fingerprint of the machine that trained it. No mlflow; torch is imported only for its versions."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Project

LOCK_FILE = "capsule.lock"
# Set by the launchers that start a stage inside the project image: the image's reference,
# by digest when it was pushed (`capsule image push`), so lineage names what really ran.
IMAGE_ENV = "CAPSULE_IMAGE"
NOT_IN_IMAGE = "not in the image"


def git_commit(root: Path) -> str:
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if r.returncode != 0:
        return "unknown"
    commit = r.stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def lock_hash(project: "Project") -> str:
    path = project.root / LOCK_FILE
    if not path.is_file():
        return "none"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_tag(project: "Project") -> str:
    from ..image.tags import project_tag

    return project_tag(project)


def running_image() -> str:
    """The image this process runs in (CAPSULE_IMAGE), or 'not in the image' on the host.

    Only the launcher's word counts: /.dockerenv also exists on hosts that are themselves
    containers (CI machines), which are not the project image."""
    return os.environ.get(IMAGE_ENV, "").strip() or NOT_IN_IMAGE


def machine_facts() -> dict[str, str]:
    """The training machine's stack, from `capsule doctor`'s probes (torchcapsule.doctor), reduced
    to what identifies it stably (no free memory, no timings): same stack -> same fingerprint."""
    from ..doctor.probes import probe

    f = probe()
    return {
        "torch": f.torch_version or "none",
        "cuda": f.torch_cuda or "none",
        "cudnn": f.cudnn or "none",
        "nccl": f.nccl or "none",
        "driver": f.driver or "none",
        "gpus": ",".join(f"{d.name} (sm {d.cc})" for d in f.devices) or "none",
        "python": f.python or platform.python_version(),
        "platform": f.platform or platform.platform(),
        "container": "yes" if f.in_container else "no",
        "host": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
    }


def fingerprint(facts: dict[str, str]) -> str:
    """A short stable hash of the facts (same stack -> same fingerprint)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
