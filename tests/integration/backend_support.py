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
