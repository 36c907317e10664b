"""Provenance recorded with each registered version: git commit, image tag, lock hash and a
fingerprint of the machine that trained it. No mlflow; torch is imported only for its versions."""
from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Project

LOCK_FILE = "capsule.lock"


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


def machine_facts() -> dict[str, str]:
    """What identifies the training machine's stack. TODO: use torchcapsule.doctor's probes once
    that lands, so `capsule doctor --json` and the registry agree on one fingerprint."""
    import torch

    facts = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "none"),
        "cudnn": str(torch.backends.cudnn.version() or "none") if torch.backends.cudnn.is_available() else "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "host": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
        "gpus": "none",
        "driver": "none",
    }
    if torch.cuda.is_available():
        facts["gpus"] = ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                facts["driver"] = r.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return facts


def fingerprint(facts: dict[str, str]) -> str:
    """A short stable hash of the facts (same stack -> same fingerprint)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
