"""The README's main job (scripts/main-job.sh runs the same `capsule pipeline run`).

The main job on a fresh copy of examples/digits: `capsule pipeline run` = doctor (pre-flight)
-> test -> train (2-rank DDP, CPU) -> evaluate -> register (applies the promotion rule) ->
serve smoke test (starts the service on the new champion, sends real requests, stops it)."""
from __future__ import annotations

import json
import shutil

import pytest

from ..conftest import EXAMPLE, run_capsule

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_main_job_from_a_fresh_copy(tmp_path, monkeypatch):
    p = tmp_path / "digits"
    shutil.copytree(EXAMPLE, p, ignore=shutil.ignore_patterns("logs", "models", "data", ".capsule",
                                                              "__pycache__", ".pytest_cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite registry
    env = {"CAPSULE_HOME": str(tmp_path / "home")}
    r = run_capsule("pipeline", "run", cwd=p, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rec = json.loads(run_capsule("pipeline", "status", "--json", cwd=p, env=env, check=True).stdout)
    assert rec["state"] == "succeeded"
    assert rec["preflight"]["exit_code"] == 0
    assert [s["name"] for s in rec["stages"]] == ["test", "train", "evaluate", "register", "serve"]
    assert {s["state"] for s in rec["stages"]} == {"succeeded"}
    assert rec["model_version"] and rec["model_version"].startswith("models:/digits/")

    from torchcapsule.config import load_project
    from torchcapsule import registry

    project = load_project(p / "capsule.yaml")
    champ = registry.resolve("models:/digits@champion", project=project)  # the rule promoted the first good model
    assert f"models:/digits/{champ.version}" == rec["model_version"]
    assert champ.metrics["accuracy"] >= 0.95
    assert project.registry.promote.alias in champ.aliases

    # nothing changed: the rerun skips every stage
    r = run_capsule("pipeline", "run", cwd=p, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    again = json.loads(run_capsule("pipeline", "status", "--json", cwd=p, env=env, check=True).stdout)
    assert {s["state"] for s in again["stages"]} == {"skipped"}
