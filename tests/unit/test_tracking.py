"""The pure side of training tracking: JSONL lines -> MLflow actions, the state file's offset,
and how the launcher hands the store to a job (embedded store mapped into containers)."""
from __future__ import annotations

import json
from pathlib import Path

from torchcapsule.launch.api import CONTAINER_MOUNTS, JobSpec
from torchcapsule.launch.command import capsule_env
from torchcapsule.registry import tracking


def test_metric_values_keep_numbers_only():
    rec = {"step": 3, "time": 1.5, "event": "x", "loss": 0.25, "epoch": 1, "ok": True, "name": "a",
           "nan": float("nan")}
    assert tracking.metric_values(rec) == {"loss": 0.25, "epoch": 1.0}


def test_split_lines_leaves_a_partial_line_and_skips_garbage():
    data = b'{"step": 1, "loss": 1}\nnot json\n[1]\n{"step": 2, "lo'
    records, used = tracking.split_lines(data)
    assert records == [{"step": 1, "loss": 1}]
    assert used == data.rfind(b"\n") + 1


def test_actions_follow_the_events():
    recs = [{"event": "started", "step": 0, "time": 1, "world_size": 2},
            {"step": 1, "time": 2, "loss": 0.5},
            {"event": "preempted", "step": 1, "time": 3},
            {"event": "resumed", "step": 1, "time": 4},
            {"step": 2, "time": 5, "loss": 0.4},
            {"event": "finished", "step": 2, "time": 6, "test_accuracy": 0.9}]
    got = [(a.kind, a.step, a.time_ms, a.metrics) for a in tracking.actions(recs)]
    assert got == [("open", 0, 1000, {"world_size": 2.0}), ("metrics", 1, 2000, {"loss": 0.5}),
                   ("pause", 1, 3000, {}), ("resume", 1, 4000, {}), ("metrics", 2, 5000, {"loss": 0.4}),
                   ("metrics", 2, 6000, {"test_accuracy": 0.9}), ("end", 2, 6000, {})]


def test_state_path_and_pending_bytes(tmp_path):
    jsonl = tmp_path / "metrics-train.jsonl"
    assert tracking.state_path(jsonl) == tmp_path / "metrics-train.mlflow.json"
    assert tracking.pending_bytes(jsonl) == 0
    jsonl.write_text('{"step": 1}\n{"step": 2}\n')
    assert tracking.pending_bytes(jsonl) == jsonl.stat().st_size
    tracking.state_path(jsonl).write_text(json.dumps({"offset": 12}))
    assert tracking.pending_bytes(jsonl) == jsonl.stat().st_size - 12


def test_a_sync_without_metrics_needs_no_store(tmp_path):
    jsonl = tmp_path / "metrics-train.jsonl"
    jsonl.write_text('{"step": 1, "note": "text only"}\n')
    res = tracking.sync(jsonl, "http://127.0.0.1:9")  # never contacted: nothing to send
    assert res.points == 0 and tracking.pending_bytes(jsonl) == 0


def _spec(tmp_path: Path, uri: str) -> JobSpec:
    vols = {v: tmp_path / v for v in ("workspace", "data", "models", "logs")}
    return JobSpec(project="p", stage="train", command=("train.py",), image="img", workdir=vols["workspace"],
                   volumes=vols, tracking={"CAPSULE_TRACKING_URI": uri, "CAPSULE_TRACKING_CONTEXT": "{}"})


def test_embedded_store_is_mapped_into_the_container(tmp_path):
    db = tmp_path / "workspace" / ".capsule" / "mlflow.db"
    spec = _spec(tmp_path, f"sqlite:///{db}")
    assert capsule_env(spec)["CAPSULE_TRACKING_URI"] == f"sqlite:///{db}"  # host: as is
    env = capsule_env(spec, mounts=CONTAINER_MOUNTS)
    assert env["CAPSULE_TRACKING_URI"] == "sqlite:////workspace/.capsule/mlflow.db"


def test_store_outside_the_volumes_is_left_to_the_host(tmp_path):
    spec = _spec(tmp_path, "sqlite:////elsewhere/mlflow.db")
    env = capsule_env(spec, mounts=CONTAINER_MOUNTS)
    assert "CAPSULE_TRACKING_URI" not in env and env["CAPSULE_TRACKING_CONTEXT"] == "{}"
    server = _spec(tmp_path, "http://mlflow:5000")
    assert capsule_env(server, mounts=CONTAINER_MOUNTS)["CAPSULE_TRACKING_URI"] == "http://mlflow:5000"


def test_sparkline_scales_and_buckets():
    from torchcapsule.pipeline.curves import sparkline

    assert sparkline([]) == ""
    assert sparkline([3, 2, 1, 0]) == "█▆▃▁"
    assert sparkline([1, 1]) == "▅▅"
    assert len(sparkline(list(range(100)), width=10)) == 10


def test_curve_is_the_last_training_and_its_run_url(tmp_path):
    from torchcapsule.pipeline.curves import curve_of, training_curve

    recs = [{"event": "started", "step": 0}, {"step": 1, "loss": 9.0},
            {"event": "started", "step": 0}, {"step": 1, "loss": 2.0, "test_accuracy": 0.5},
            {"event": "resumed", "step": 1}, {"step": 2, "loss": 1.0, "test_accuracy": 0.9},
            {"event": "finished", "step": 2, "test_accuracy": 0.91}]
    assert curve_of(recs) == ("loss", [2.0, 1.0])
    assert curve_of(recs, "test_accuracy") == ("test_accuracy", [0.5, 0.9])
    (tmp_path / "metrics-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = training_curve(tmp_path, "train")
    assert c.text() == "loss █▁ 1" and c.url is None
    tracking.state_path(tmp_path / "metrics-train.jsonl").write_text(json.dumps(
        {"run_id": "abc", "experiment_id": "3", "tracking_uri": "sqlite:////x/mlflow.db"}))
    assert training_curve(tmp_path, "train").url == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert training_curve(tmp_path, "evaluate") is None


class _Recorder:
    """The MlflowClient calls _apply makes, recorded (no store: this is the pure replay logic)."""

    def __init__(self):
        self.runs, self.points, self.ended = [], [], []

    def create_run(self, exp_id, start_time, tags, run_name):
        from types import SimpleNamespace

        self.runs.append(start_time)
        return SimpleNamespace(info=SimpleNamespace(run_id=f"run{len(self.runs)}"))

    def log_batch(self, run_id, metrics=(), params=()):
        self.points += [(run_id, m.key, m.step) for m in metrics]

    def set_terminated(self, run_id, status, end_time):
        self.ended.append((run_id, status))

    def update_run(self, run_id, status):
        pass


def test_a_sync_redone_after_a_kill_reopens_no_run(tmp_path, monkeypatch, mlflow_installed):
    """A sync killed after opening the run but before saving its offset is redone from the old
    offset: the "started" line finds the run it opened (saved at once), so there is one run; the
    points go to it again and the SQL store drops the copies (same key, step, time and value)."""
    monkeypatch.setattr("torchcapsule.registry.mlflow._experiment", lambda client, name, loc: "1")
    jsonl = tmp_path / "metrics-train.jsonl"
    todo = tracking.actions([{"event": "started", "step": 0, "time": 1}, {"step": 1, "time": 2, "loss": 0.5},
                             {"event": "finished", "step": 1, "time": 3}])
    client, st, saved = _Recorder(), {}, []
    tracking._apply(client, st, todo, jsonl, save=lambda: saved.append(dict(st)))
    assert saved and saved[0]["run_id"] == "run1" and saved[0]["run_start_ms"] == 1000
    redo = dict(saved[0])  # the state as the killed sync left it on disk
    tracking._apply(client, redo, todo, jsonl)
    assert client.runs == [1000] and redo["run_id"] == "run1"
    assert {p[0] for p in client.points} == {"run1"} and client.ended == [("run1", "FINISHED")] * 2
    # a later "started" line (another start time) is a new training: a new run
    tracking._apply(client, redo, tracking.actions([{"event": "started", "step": 0, "time": 9}]), jsonl)
    assert client.runs == [1000, 9000] and redo["run_id"] == "run2"
