"""The CLI starts fast: --help and validate import neither torch nor mlflow."""
from __future__ import annotations

import subprocess
import sys

import pytest


from ..conftest import EXAMPLE

HEAVY = ("torch", "mlflow", "fastapi", "kubernetes", "numpy", "uvicorn")


def _imported(*args: str) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchcapsule.cli.main", *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mods = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


@pytest.mark.parametrize("args", [("--help",), ("validate", str(EXAMPLE / "capsule.yaml"))])
def test_light_commands_import_nothing_heavy(args):
    mods = _imported(*args)
    assert "torchcapsule" in mods
    assert not (mods & set(HEAVY)), mods & set(HEAVY)


def test_unknown_command_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "No such command" in r.stderr and "Traceback" not in r.stderr
