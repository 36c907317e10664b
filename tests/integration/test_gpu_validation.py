"""scripts/gpu-validation.sh end to end. Without a GPU it is the CPU dry run (gloo, fp32,
--device cpu, 2 epochs); on a GPU machine the same test runs the GPU checks (NCCL, bf16, cuda)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_validation_script(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "EPOCHS": "2", "GIT_COMMIT": "test", "CAPSULE_IMAGE": "digits:2.13.0-cu130-py3.11-slim"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu-validation.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["run.log", "doctor.json", "doctor-bench.json", "train.log", "metrics-train.jsonl",
                            "serve.log", "summary.json", "summary.md"])  # the device tool returns 8 at most
    s = json.loads((out / "summary.json").read_text())
    assert s["schema"] == "torchcapsule.gpu-validation/v1"
    assert all(s["checks"].values()), s["checks"]
    assert s["commit"] == "test"
    if s["mode"] == "cpu":
        assert s["status"] == "no GPU: CPU dry run: all checks passed"
        assert "no GPU: CPU dry run" in r.stdout
        assert (s["train"]["backend"], s["train"]["precision"]) == ("gloo", "fp32")
        # step 4 says plainly why the CUDA image was not checked (no GPU, or no Docker engine)
        assert "skipped image: no" in r.stdout and s["steps"]["image"]["exit_code"] == "skipped"
    else:
        assert (s["train"]["backend"], s["train"]["precision"]) == ("nccl", "bf16")
    assert s["train"]["metrics_started"]["precision"] == s["train"]["precision"]
    assert s["serve"]["ok"] and s["serve"]["requests"] == 8
    assert "| checks |" in (out / "summary.md").read_text()
    assert not list(Path(tmp_path).glob("gpu-validation.*")), "the scratch directory was left behind"
