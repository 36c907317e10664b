"""The digits example end to end with the real CLI and real torchrun: 2 gloo ranks on the CPU."""
from __future__ import annotations

import json
import re

import pytest

from torchcapsule.train import read_metrics

from .train_support import capsule, example_copy

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_train_two_ranks_then_evaluate(tmp_path):
    project = example_copy(tmp_path)

    dry = capsule(project, tmp_path, "run", "train", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "-m torchcapsule.launch.torchrun" in dry.stdout and "--nproc_per_node 2" in dry.stdout
    assert "--max_restarts 2" in dry.stdout and "CAPSULE_MODELS_DIR=" in dry.stdout
    port = int(re.search(r"--rdzv_endpoint 127\.0\.0\.1:(\d+)", dry.stdout).group(1))
    assert port != 29500

    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"job (local:\S+)", r.stderr).group(1)
    assert "[rank0]:" in r.stdout
    log = next((project / "logs" / "jobs").glob("*.log")).read_text()
    assert "[rank0]:" in log and "[rank1]:" in log  # both ranks' output kept in the logs volume

    model_dir = project / "models" / "digits"
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "model.py", "meta.json"}
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["metrics"]["accuracy"] >= 0.95 and meta["params"]["world_size"] == 2
    events = [m for m in read_metrics(project / "logs" / "metrics-train.jsonl") if "event" in m]
    assert events[0]["event"] == "started" and events[0]["world_size"] == 2
    assert events[-1]["event"] == "finished" and events[-1]["step"] == meta["step"]

    st = capsule(project, tmp_path, "jobs", "status", job_id, "--json")
    assert json.loads(st.stdout)["state"] == "SUCCEEDED"
    listed = capsule(project, tmp_path, "jobs", "list")
    assert job_id in listed.stdout

    ev = capsule(project, tmp_path, "run", "evaluate")
    assert ev.returncode == 0, ev.stdout + ev.stderr
    result = json.loads((project / "logs" / "metrics-evaluate.json").read_text())
    assert result["accuracy"] >= 0.95
    assert json.loads((model_dir / "meta.json").read_text())["metrics"]["accuracy"] == result["accuracy"]


def test_test_stage_runs_the_examples_own_tests(tmp_path):
    project = example_copy(tmp_path)
    r = capsule(project, tmp_path, "run", "test")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout)
