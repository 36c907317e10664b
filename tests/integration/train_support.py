"""Helpers for the training integration tests: a private copy of the digits example per test."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from tests.conftest import EXAMPLE, REPO, run_capsule

_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "models", "logs", "data", ".capsule")


def example_copy(tmp_path: Path, *, epochs: int | None = None, extra_stages: dict | None = None) -> Path:
    dest = tmp_path / "digits"
    shutil.copytree(EXAMPLE, dest, ignore=_SKIP)
    if epochs is not None or extra_stages:
        cfg = dest / "capsule.yaml"
        data = yaml.safe_load(cfg.read_text())
        if epochs is not None:
            data["stages"]["train"]["run"] = f"train.py --epochs {epochs}"
        data["stages"].update(extra_stages or {})
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def capsule_env(tmp_path: Path) -> dict[str, str]:
    """Job records under the test's own CAPSULE_HOME; this checkout's torchcapsule first on the path."""
    pp = os.environ.get("PYTHONPATH", "")
    return {"CAPSULE_HOME": str(tmp_path / "home"),
            "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{pp}" if pp else str(REPO / "src")}


def capsule(project: Path, tmp_path: Path, *args: str, timeout: float = 300):
    return run_capsule(*args, cwd=project, env=capsule_env(tmp_path), timeout=timeout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpoints(project: Path) -> list[str]:
    d = project / "models" / ".checkpoints" / "digits-train"
    return sorted(p.name for p in d.glob("ckpt-*")) if d.is_dir() else []


def running(pid: int) -> bool:
    """A live process (a zombie waiting to be reaped is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
