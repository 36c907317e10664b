"""Helpers for the backend integration tests: a private copy of the example with extra stages.

The copy lives in its own mkdtemp directory, not pytest's tmp_path: jobs keep writing there
after a test step returns, and pytest-of-<user> directories are rotated by other sessions.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from tests.conftest import EXAMPLE, run_capsule

EXTRA_STAGES = """\
  fail:
    run: python -c "import sys; print('bad input on purpose', flush=True); sys.exit(3)"
  sleep:
    run: sleep 300
"""


def copy_example(prefix: str, *, image_registry: str | None = None, flavor: str | None = None) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    dest = root / "digits"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(
        "models", "logs", "data", ".capsule", "__pycache__", ".pytest_cache", "wheels", "build"))
    text = (dest / "capsule.yaml").read_text()
    text = text.replace("\nstages:\n", "\nstages:\n" + EXTRA_STAGES, 1)
    if image_registry:
        text = text.replace("\nimage:\n", f"\nimage:\n  registry: {image_registry}\n", 1)
    if flavor:
        text = re.sub(r"(?m)^  flavor: .*$", f"  flavor: {flavor}", text)
    (dest / "capsule.yaml").write_text(text)
    return dest


def job_id_in(text: str, backend: str) -> str:
    m = re.search(rf"\b{backend}:[\w./-]+", text)
    assert m, text
    return m.group(0)


def status(job_id: str, cwd: Path, **kw) -> dict:
    r = run_capsule("jobs", "status", job_id, "--json", cwd=cwd, check=True, timeout=60, **kw)
    return json.loads(r.stdout)


def wait_for(job_id: str, cwd: Path, states: set[str], timeout: float = 240, **kw) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status(job_id, cwd, **kw)
        if st["state"] in states or time.monotonic() > deadline:
            return st
        time.sleep(1)


# Two-node stages for the multi-node tests (docker, Slurm): every rank writes "HOST PID" where it
# runs, then waits; in `nodefail` local rank 1 of the host named FAIL_HOST exits 7.
NODE_SCRIPT = '''\
import os, socket, sys, time
from pathlib import Path
mark = Path(os.environ["CAPSULE_LOGS_DIR"]) / "ranks"
mark.mkdir(parents=True, exist_ok=True)
(mark / f"rank{os.environ['RANK']}").write_text(f"{socket.gethostname()} {os.getpid()}")
if sys.argv[1] == "fail" and socket.gethostname() == FAIL_HOST and os.environ["LOCAL_RANK"] == "1":
    print(f"rank {os.environ['RANK']} fails on purpose on {socket.gethostname()}", flush=True)
    sys.exit(7)
time.sleep(600)
'''
NODE_STAGES = """\
  nodefail:
    run: node_stage.py fail
    distributed: ddp
    resources: {nodes: 2, cpus: 2}
  nodesleep:
    run: node_stage.py sleep
    distributed: ddp
    resources: {nodes: 2, cpus: 2}
"""


def add_node_stages(project: Path, *, fail_host: str) -> Path:
    """Add `nodefail` and `nodesleep` (2 nodes, ddp) to a copied example project."""
    (project / "node_stage.py").write_text(f"FAIL_HOST = {fail_host!r}\n" + NODE_SCRIPT)
    text = (project / "capsule.yaml").read_text()
    (project / "capsule.yaml").write_text(text.replace("\nstages:\n", "\nstages:\n" + NODE_STAGES, 1))
    return project
