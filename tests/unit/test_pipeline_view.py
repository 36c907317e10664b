"""The pipeline's view apart from its engine: the engine runs a real stage with rich unimportable
and reports through plain Events; `capsule pipeline status` shows a training's sparkline next to
its final value and its MLflow run, read from a recorded run + metrics JSONL + tracking state."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from torchcapsule.pipeline.curves import Curve, sparkline, training_curve
from torchcapsule.pipeline.record import RunRecord, RunStore, StageRecord
from torchcapsule.registry import tracking

from ..conftest import run_capsule

ENGINE = """
import sys
sys.modules["rich"] = None  # the engine must not need it
from torchcapsule.config import load_project
from torchcapsule.pipeline.runner import Events, PipelineRunner, RunOptions

class Seen(Events):
    def __init__(self): self.seen = []
    def stage(self, st): self.seen.append(["stage", st.name, st.state])
    def log(self, name, line): self.seen.append(["log", name, line])

ev = Seen()
rec = PipelineRunner(load_project("capsule.yaml"), RunOptions(doctor=False, poll_s=0.05), events=ev).run()
print(rec.state, __import__("json").dumps(ev.seen))
"""


def test_the_engine_reports_through_plain_events_without_rich(tmp_path):
    (tmp_path / "capsule.yaml").write_text(
        "name: toy\nstages:\n  a:\n    run: python -c \"print('hello from a')\"\n"
        "  b:\n    run: python -c \"import sys; sys.exit(3)\"\n    needs: [a]\n")
    r = subprocess.run([sys.executable, "-c", ENGINE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CAPSULE_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr[-3000:]
    state, seen = r.stdout.split(" ", 1)
    seen = json.loads(seen)
    assert state == "failed"
    stages = [e[1:] for e in seen if e[0] == "stage"]
    assert stages == [["a", "running"], ["a", "succeeded"], ["b", "running"], ["b", "failed"]]
    assert ["log", "a", "hello from a"] in seen


def test_sparkline_draws_the_shape_and_buckets_long_curves():
    assert sparkline([2.0, 1.0, 0.5]) == "█▃▁"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline(list(range(1000)), width=8) == "▁▂▃▄▅▆▇█"  # bucket means keep the shape
    assert sparkline([5.0]) == "▅"
    assert Curve("loss", (2.0, 1.0, 0.5)).text() == "loss █▃▁ 0.5"


def test_run_link_is_the_servers_url_or_capsule_ui_for_the_embedded_store():
    url = "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert Curve("loss", (1.0,), "abc", url).link() == f"`capsule ui`, then {url}"
    remote = "https://mlflow.example.com/#/experiments/3/runs/abc"
    assert Curve("loss", (1.0,), "abc", remote, served=True).link() == remote
    assert Curve("loss", (1.0,)).link() is None  # not synced yet: no run


def _training(logs: Path, losses: list[float], state: dict | None) -> float:
    logs.mkdir(parents=True, exist_ok=True)
    jsonl = logs / "metrics-train.jsonl"
    recs = [{"event": "started", "step": 0}] + [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    if state:
        tracking.state_path(jsonl).write_text(json.dumps(state))
    return jsonl.stat().st_mtime


def test_curve_belongs_to_the_attempt_that_wrote_it(tmp_path):
    written = _training(tmp_path, [2.0, 1.0], None)
    assert training_curve(tmp_path, "train", since=written - 5, until=written + 1).values == (2.0, 1.0)
    assert training_curve(tmp_path, "train", since=written + 5) is None  # an attempt after it
    assert training_curve(tmp_path, "train", since=written - 60, until=written - 30) is None  # before it
    assert training_curve(tmp_path, "train").values == (2.0, 1.0)  # a skipped stage: the latest


def _recorded_run(p: Path, uri: str) -> None:
    (p / "capsule.yaml").write_text("name: toy\nstages:\n  train: {run: train.py}\n"
                                    "  report: {run: report.py, needs: [train]}\n")
    logs = p / "logs"
    written = _training(logs, [2.0, 1.0, 0.5], {"run_id": "abc123", "experiment_id": "3", "tracking_uri": uri})
    train = StageRecord("train", "succeeded", started_at=written - 10, finished_at=written + 0.5,
                        duration_s=10.5, exit_code=0, metric={"loss": 0.5})
    report = StageRecord("report", "succeeded", started_at=written + 1, finished_at=written + 2, exit_code=0)
    RunStore(logs).save(RunRecord("20261202-120000-aaaaaa", "toy", "local", state="succeeded",
                                  started_at=time.time(), stages=[train, report]))


def test_status_shows_the_curve_next_to_the_final_value_and_the_mlflow_run(tmp_path):
    _recorded_run(tmp_path, f"sqlite:///{tmp_path}/.capsule/mlflow.db")
    r = run_capsule("pipeline", "status", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "train: loss █▃▁ 0.5" in lines
    assert "  MLflow run: `capsule ui`, then http://127.0.0.1:5000/#/experiments/3/runs/abc123" in lines
    assert not any(ln.startswith("report:") for ln in lines)  # no training, no curve


def test_status_links_a_tracking_servers_run_directly(tmp_path):
    _recorded_run(tmp_path, "https://mlflow.example.com/")
    r = run_capsule("pipeline", "status", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "  MLflow run: https://mlflow.example.com/#/experiments/3/runs/abc123" in r.stdout.splitlines()
