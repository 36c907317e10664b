"""Training that survives everything (issue 13), on the real local launcher with the digits example."""
from __future__ import annotations

import json
import os

import pytest

from torchcapsule.train import read_metrics

from .train_support import capsule, checkpoints, example_copy, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _events(project, name):
    path = project / "logs" / "metrics-train.jsonl"
    return [m for m in read_metrics(path) if m.get("event") == name] if path.exists() else []


def _status(project, tmp_path, job):
    return json.loads(capsule(project, tmp_path, "jobs", "status", job, "--json").stdout)


def test_every_cancel_saves_a_checkpoint_and_exits_75(tmp_path):
    """The lost-SIGTERM bug ended 3 of 11 cancels with SIGKILL and no checkpoint; each of these must
    preempt cleanly, and each rerun resumes from exactly where the previous one stopped."""
    project = example_copy(tmp_path, epochs=400)
    stopped_at = 0
    for i in range(3):
        r = capsule(project, tmp_path, "run", "train", "--detach")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        began = lambda: len(_events(project, "started")) + len(_events(project, "resumed")) == i + 1  # noqa: E731
        wait_for(began, 180, f"run {i + 1} to start training")
        assert capsule(project, tmp_path, "jobs", "cancel", job).returncode == 0
        wait_for(lambda: _status(project, tmp_path, job)["state"] in ("CANCELLED", "FAILED", "SUCCEEDED"),
                 180, f"run {i + 1} to stop")
        st = _status(project, tmp_path, job)
        log = capsule(project, tmp_path, "jobs", "logs", job).stdout
        assert (st["state"], st["exit_code"]) == ("CANCELLED", 75), f"run {i + 1}: {st}\n{log[-4000:]}"
        preempted = _events(project, "preempted")
        assert len(preempted) == i + 1, log[-4000:]
        step = preempted[-1]["step"]
        assert f"ckpt-{step:09d}" in checkpoints(project)  # the checkpoint of the step it stopped at
        if i:
            assert _events(project, "resumed")[-1]["step"] == stopped_at  # resumed where the last run stopped
        assert step >= stopped_at
        stopped_at = step
        for f in (project / "logs" / "pids").glob("rank-*.pid"):
            assert not running(int(f.read_text())), f"{f.name} outlived its job"


def test_corrupt_newest_checkpoints_are_skipped_and_the_rerun_resumes_from_a_good_one(tmp_path):
    project = example_copy(tmp_path, epochs=3)  # 66 steps: checkpoints at 20, 40, 60
    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ckdir = project / "models" / ".checkpoints" / "digits-train"
    (ckdir / "FINISHED").unlink()  # as if the run had died after its last checkpoint
    assert checkpoints(project) == ["ckpt-000000020", "ckpt-000000040", "ckpt-000000060"]
    model = ckdir / "ckpt-000000060" / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)
    state = ckdir / "ckpt-000000040" / "state.pt"
    state.write_bytes(os.urandom(state.stat().st_size))

    r = capsule(project, tmp_path, "run", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    said = [line for line in (r.stdout + r.stderr).splitlines() if "is corrupt" in line]
    assert len(said) == 1, said  # one line for both, on rank 0 only
    assert "ckpt-000000060 is corrupt (model.safetensors" in said[0]
    assert "ckpt-000000040 is corrupt (state.pt: checksum mismatch)" in said[0]
    assert said[0].endswith("resuming from ckpt-000000020")
    assert "resumed from step 20 " in r.stdout and "resumed from step 60" not in r.stdout
    assert _events(project, "resumed")[-1]["step"] == 20
    assert (ckdir / ".corrupt-ckpt-000000060").is_dir()  # kept for inspection, not deleted
