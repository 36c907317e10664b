"""Fingerprints, skip decisions and run records (plain data and tmp_path files)."""
from __future__ import annotations

import json
import os

import pytest

from torchcapsule.errors import PipelineError
from torchcapsule.pipeline import cache
from torchcapsule.pipeline.cache import Decision, LastAttempt, decide, fingerprint
from torchcapsule.pipeline.record import RunRecord, RunStore, StageRecord, new_run_id

CFG = {"run": "python train.py", "env": {}}


def test_fingerprint_changes_with_each_part_and_not_with_order():
    base = fingerprint(CFG, {"a.py": "1", "b.py": "2"}, "img:1", {"test": "f"})
    assert base == fingerprint(CFG, {"b.py": "2", "a.py": "1"}, "img:1", {"test": "f"})
    assert base != fingerprint(CFG, {"a.py": "1", "b.py": "3"}, "img:1", {"test": "f"})
    assert base != fingerprint({**CFG, "run": "python train.py --epochs 2"}, {"a.py": "1", "b.py": "2"}, "img:1", {"test": "f"})
    assert base != fingerprint(CFG, {"a.py": "1", "b.py": "2"}, "img:2", {"test": "f"})
    assert base != fingerprint(CFG, {"a.py": "1", "b.py": "2"}, "img:1", {"test": "g"})
    assert base != fingerprint(CFG, {"a.py": "1"}, "img:1", {"test": "f"})


def test_decide():
    ok = LastAttempt("r1", "succeeded", "fp")
    assert decide("fp", ok) == Decision(False, "unchanged since run r1", cached_from="r1")
    assert decide("fp", LastAttempt("r2", "skipped", "fp")).run is False
    assert decide("fp2", ok) == Decision(True, "config, image or an upstream stage changed")
    with_inputs = LastAttempt("r1", "succeeded", "fp", {"a.py": "1", "b.py": "2"})
    assert decide("fp2", with_inputs, inputs={"a.py": "1", "b.py": "3", "c.py": "4"}) == \
        Decision(True, "inputs changed: b.py, c.py")
    assert decide("fp2", with_inputs, inputs={"a.py": "1", "b.py": "2"}).reason == \
        "config, image or an upstream stage changed"
    many = {f"f{i}.py": "x" for i in range(5)}
    assert decide("fp2", with_inputs, inputs=many).reason.endswith("and 4 more")
    assert decide("fp", ok, force=True) == Decision(True, "--force")
    assert decide("fp", None) == Decision(True, "no earlier run")
    # a failed or interrupted last attempt reruns even with the same inputs (resume)
    assert decide("fp", LastAttempt("r3", "failed", "fp")) == Decision(True, "last attempt failed (run r3)")
    assert decide("fp", LastAttempt("r3", "interrupted", "fp")).run is True
    assert decide("fp", ok, missing_outputs=["models/digits"]) == Decision(True, "outputs missing: models/digits")


def test_hash_inputs_globs_directories_and_content(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def test(): pass\n")
    (tmp_path / "tests" / "__pycache__").mkdir()
    (tmp_path / "tests" / "__pycache__" / "t.pyc").write_bytes(b"\0")
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "w.bin").write_bytes(b"weights")
    h = cache.hash_inputs(tmp_path, ["*.py", "tests", "models/m"])
    assert sorted(h) == ["a.py", "models/m/w.bin", "tests/t.py"]
    (tmp_path / "a.py").write_text("x = 2\n")
    assert cache.hash_inputs(tmp_path, ["*.py"])["a.py"] != h["a.py"]
    assert cache.missing_outputs(tmp_path, ["models/m", "models/other"]) == ["models/other"]


def _rec(run_id, started, stages, state="failed"):
    r = RunRecord(run_id=run_id, project="p", backend="local", state=state, started_at=started)
    r.stages = [StageRecord(name=n, state=s, fingerprint=f) for n, s, f in stages]
    return r


def test_store_round_trip_latest_prefix_and_last_attempt(tmp_path):
    store = RunStore(tmp_path)
    store.save(_rec("20260101-000000-aaaaaa", 1.0, [("a", "succeeded", "fa"), ("b", "failed", "fb")]))
    store.save(_rec("20260102-000000-bbbbbb", 2.0, [("a", "skipped", "fa"), ("b", "pending", None)],
                    state="interrupted"))
    assert [r.run_id for r in store.all()] == ["20260102-000000-bbbbbb", "20260101-000000-aaaaaa"]
    assert store.load().run_id == "20260102-000000-bbbbbb"
    assert store.load("20260101").stages[1].state == "failed"
    assert store.last_attempt("a") == LastAttempt("20260102-000000-bbbbbb", "skipped", "fa", {})
    # b was only pending in the newest run: the decision comes from its failed attempt before
    assert store.last_attempt("b") == LastAttempt("20260101-000000-aaaaaa", "failed", "fb", {})
    assert store.last_attempt("c") is None
    with pytest.raises(PipelineError, match="ambiguous"):
        store.load("2026")
    with pytest.raises(PipelineError, match="no run 'zzz'"):
        store.load("zzz")
    with pytest.raises(PipelineError, match="no pipeline runs recorded"):
        RunStore(tmp_path / "empty").load()


def test_a_running_record_whose_process_is_gone_reads_as_interrupted(tmp_path):
    store = RunStore(tmp_path)
    rec = _rec(new_run_id(), 1.0, [("a", "succeeded", "fa"), ("b", "running", "fb")], state="running")
    rec.pid = 2**22 + 12345  # above pid_max: no such process
    while True:
        try:
            os.kill(rec.pid, 0)
            rec.pid += 1
        except ProcessLookupError:
            break
    store.save(rec)
    back = store.load()
    assert back.state == "interrupted" and back.stage("b").state == "interrupted"
    assert back.failed_stage == "b"


def test_damaged_record_files_are_ignored_and_saves_are_atomic(tmp_path):
    store = RunStore(tmp_path)
    store.dir.mkdir(parents=True)
    (store.dir / "junk.json").write_text("{not json")
    rec = _rec("r1", 1.0, [("a", "succeeded", "f")])
    path = store.save(rec)
    assert json.loads(path.read_text())["stages"][0]["name"] == "a"
    assert [r.run_id for r in store.all()] == ["r1"]
    assert not list(store.dir.glob("*.tmp*"))
