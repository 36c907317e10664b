"""Checkpoints that survive misuse: verification and fallback, one writer per directory, disk full,
dead saves cleared at start, and a failed rank's cause as its last line (issue 13)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from torchcapsule import dirlock
from torchcapsule.errors import CheckpointBusy, CheckpointError
from torchcapsule.train import Checkpointer, Preemption
from torchcapsule.train.checkpoint import LOCK_HELD_ENV, MODEL_FILE, STATE_FILE, checkpoint_problem, disk_full

REPO_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _ck(directory, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    return Checkpointer(directory, model=model, optimizer=torch.optim.AdamW(model.parameters()), **kw)


def _saved(tmp_path, steps=(10, 20, 30)):
    ck = _ck(tmp_path)
    for s in steps:
        ck.save(s)
    return ck


@pytest.mark.parametrize("damage,why", [
    (lambda p: os.truncate(p / MODEL_FILE, (p / MODEL_FILE).stat().st_size // 2), "bytes"),
    (lambda p: (p / MODEL_FILE).write_bytes(os.urandom((p / MODEL_FILE).stat().st_size)), "safetensors header"),
    (lambda p: (p / STATE_FILE).write_bytes(os.urandom((p / STATE_FILE).stat().st_size)), "checksum mismatch"),
])
def test_corrupt_latest_falls_back_to_newest_good_one_saying_so(tmp_path, capsys, damage, why):
    _saved(tmp_path)
    damage(tmp_path / "ckpt-000000030")
    ck = _ck(tmp_path)
    got = ck.resume()
    assert got["step"] == 20 and ck.resumed_from == tmp_path / "ckpt-000000020"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "ckpt-000000030 is corrupt" in lines[0] and why in lines[0] and "resuming from ckpt-000000020" in lines[0]
    # kept for inspection, out of the way of later resumes and saves
    assert (tmp_path / ".corrupt-ckpt-000000030").is_dir() and [s for s, _ in ck.checkpoints()] == [10, 20]
    assert _ck(tmp_path).resume()["step"] == 20 and capsys.readouterr().err == ""


def test_no_good_checkpoint_starts_at_zero_and_never_claims_to_resume(tmp_path, capsys):
    _saved(tmp_path, steps=(10,))
    os.truncate(tmp_path / "ckpt-000000010" / STATE_FILE, 3)
    ck = _ck(tmp_path)
    assert ck.resume() is None and ck.resumed_from is None
    assert "starting from step 0" in capsys.readouterr().err


def test_fresh_checkpoint_verifies_and_records_sizes_and_checksums(tmp_path):
    path = _ck(tmp_path).save(5)
    assert checkpoint_problem(path) is None
    assert set(__import__("json").loads((path / "manifest.json").read_text())["files"]) == {MODEL_FILE, STATE_FILE}


def test_dead_saves_are_removed_at_start_and_a_save_keeps_others_dirs(tmp_path):
    _saved(tmp_path, steps=(10,))
    dead = tmp_path / ".tmp-ckpt-000000020-999999"
    dead.mkdir()
    (dead / MODEL_FILE).write_bytes(b"half")
    ck = _ck(tmp_path)
    assert ck.resume()["step"] == 10 and not dead.exists()


def test_disk_full_is_one_line_naming_the_checkpoint_and_leaves_nothing_partial(tmp_path, monkeypatch):
    ck = _saved(tmp_path, steps=(10,))

    def full(*a, **k):
        raise RuntimeError("[enforce fail] PytorchStreamWriter failed writing file data/0") from \
            OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torchcapsule.train.checkpoint.torch.save", full)
    with pytest.raises(CheckpointError) as e:
        ck.save(20)
    assert str(e.value).startswith(f"no space left on device writing {tmp_path / 'ckpt-000000020'}: free space")
    assert "volumes.models" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-000000010"]
    assert disk_full(OSError(errno.EDQUOT, "quota")) and not disk_full(ValueError("x"))


HOLDER = textwrap.dedent("""
    import sys, torch
    from torchcapsule.train import Checkpointer
    ck = Checkpointer(sys.argv[1], model=torch.nn.Linear(8, 3))
    ck.save(1)
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


def test_second_writer_of_a_directory_is_refused_naming_the_first(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_SRC, *sys.path]), "CAPSULE_JOB_ID": "local:first-job"}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "holding"  # an event, not a delay
        ck = _ck(tmp_path)
        with pytest.raises(CheckpointBusy) as e:
            ck.save(2)
        assert "is in use by local:first-job" in str(e.value) and "`capsule jobs cancel local:first-job`" in str(e.value)
        with pytest.raises(CheckpointBusy):
            ck.resume()
        assert not (tmp_path / "ckpt-000000002").exists()
        # a job whose launcher holds the lock for it: its ranks do not take it again
        monkeypatch.setenv(LOCK_HELD_ENV, dirlock.holder(tmp_path))
        assert _ck(tmp_path).resume()["step"] == 1
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    monkeypatch.delenv(LOCK_HELD_ENV)
    # the kernel released the dead holder's lock: the directory is free again
    assert dirlock.holder(tmp_path) is None and _ck(tmp_path).save(3) is not None


def test_failed_rank_prints_its_cause_as_the_last_line(tmp_path):
    script = ("from torchcapsule.train import init_distributed\nfrom torchcapsule.errors import CheckpointError\n"
              "init_distributed()\nraise CheckpointError('no space left on device writing /m/ckpt-1: free space')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_SRC, *sys.path])}
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(v, None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr  # the traceback stays in the log
    assert r.stderr.strip().splitlines()[-1] == \
        "torchcapsule: rank 0 failed: no space left on device writing /m/ckpt-1: free space"


def test_preemption_names_the_signal_and_the_rank_that_got_it(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    p = Preemption()
    try:
        p._stop = (15, 1)  # what the reduction yields when only rank 1 got SIGTERM
        with pytest.raises(SystemExit):
            p.exit()
    finally:
        p.restore()
    assert "preempted by signal 15 on rank 1; rank 0 exiting 75" in capsys.readouterr().err
