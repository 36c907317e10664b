"""The digits example through `capsule pipeline run` on the local backend, for real: pytest,
2-rank DDP training on the CPU, evaluation. A failure injected in `evaluate` (its `run` in
capsule.yaml replaced by a command that exits 3, so no code file and no other stage's
fingerprint changes) stops the run there; after the fix the rerun skips test and train and
resumes at evaluate. What follows evaluate (register, serve) is the main job's business
(tests/integration/test_main_job.py)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ..conftest import EXAMPLE, run_capsule

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROKEN = "python -c \"import sys; print('evaluate injected failure'); sys.exit(3)\""


def _status(p: Path, env: dict) -> dict:
    r = run_capsule("pipeline", "status", "--json", cwd=p, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _states(rec: dict) -> dict[str, str]:
    return {s["name"]: s["state"] for s in rec["stages"]}


def test_failure_in_evaluate_stops_there_and_the_rerun_resumes_at_evaluate(tmp_path):
    p = tmp_path / "digits"
    shutil.copytree(EXAMPLE, p, ignore=shutil.ignore_patterns("logs", "models", "data", ".capsule",
                                                              "__pycache__", ".pytest_cache"))
    env = {"CAPSULE_HOME": str(tmp_path / "home")}
    cfg = p / "capsule.yaml"
    original = cfg.read_text()
    assert "run: python evaluate.py" in original
    cfg.write_text(original.replace("run: python evaluate.py", f"run: {BROKEN}"))

    r = run_capsule("pipeline", "run", "--no-doctor", cwd=p, env=env, timeout=900)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr
    first = _status(p, env)
    assert _states(first) == {"test": "succeeded", "train": "succeeded", "evaluate": "failed",
                              "register": "pending", "serve": "pending"}
    ev = next(s for s in first["stages"] if s["name"] == "evaluate")
    assert ev["exit_code"] == 3 and "injected failure" in ev["reason"]
    train = next(s for s in first["stages"] if s["name"] == "train")
    train_log = Path(train["log"]).read_text()
    assert "world_size=2 backend=gloo" in train_log  # 2-rank DDP
    assert (p / "models" / "digits" / "model.safetensors").is_file()
    # the summary shows the training's curve next to its final value, and its MLflow run
    curve = re.search(r"^train: loss ([▁▂▃▄▅▆▇█]+) (\S+)$", r.stdout, re.M)
    assert curve, r.stdout[-3000:]
    link = re.search(r"^  MLflow run: `capsule ui`, then http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/(\w+)$",
                     r.stdout, re.M)
    assert link, r.stdout[-3000:]
    from torchcapsule.registry.tracking import metric_history, read_state

    uri = read_state(p / "logs" / "metrics-train.jsonl")["tracking_uri"]
    losses = metric_history(uri, link.group(2), "loss")  # the linked run holds that curve
    assert len(losses) >= len(curve.group(1)) and f"{losses[-1][1]:.4g}" == curve.group(2)

    cfg.write_text(original)  # the fix
    r = run_capsule("pipeline", "run", "--no-doctor", cwd=p, env=env, timeout=900)
    second = _status(p, env)
    assert second["resumed_from"] == first["run_id"]
    states = _states(second)
    assert states["test"] == "skipped" and states["train"] == "skipped", r.stdout[-3000:]
    assert f"train: loss {curve.group(1)} {curve.group(2)}" in r.stdout  # a skipped training: its curve
    assert states["evaluate"] == "succeeded", r.stdout[-3000:]
    ev = next(s for s in second["stages"] if s["name"] == "evaluate")
    assert ev["metric"]["accuracy"] >= 0.9
    meta = json.loads((p / "models" / "digits" / "meta.json").read_text())
    assert meta["metrics"]["accuracy"] == ev["metric"]["accuracy"]
