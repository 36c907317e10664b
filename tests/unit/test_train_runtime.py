"""torchcapsule.train in one process: checkpoint round trip, pruning, safe loading, amp choice, metrics."""
from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch

from torchcapsule.train import Checkpointer, MetricsLogger, Preemption, init_distributed, read_metrics
from torchcapsule.train.amp import choose_mode, mixed_precision
from torchcapsule.train.checkpoint import STATE_FILE, default_checkpoint_dir
from torchcapsule.train.dist import pick_backend


def _setup():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, n=3):
    for _ in range(n):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_roundtrip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = _setup()
    _train(model, opt, sched)
    ck = Checkpointer(tmp_path, model=model, optimizer=opt, scheduler=sched)
    ck.save(3, extra={"epoch": 1})
    after_save = (torch.rand(3), random.random())

    model2, opt2, sched2 = _setup()
    torch.manual_seed(123)
    random.seed(5)
    got = Checkpointer(tmp_path, model=model2, optimizer=opt2, scheduler=sched2).resume()
    assert got == {"step": 3, "extra": {"epoch": 1}}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.state_dict()["last_epoch"] == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # RNG restored: the same random numbers come next as right after the save
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]


def test_state_loads_with_weights_only_and_model_is_safetensors(tmp_path):
    model, opt, sched = _setup()
    path = Checkpointer(tmp_path, model=model, optimizer=opt, scheduler=sched).save(7)
    torch.load(path / STATE_FILE, weights_only=True)  # raises if anything needs unpickling
    from safetensors.torch import load_file

    assert set(load_file(path / "model.safetensors")) == set(model.state_dict())


def test_keeps_last_n_and_ignores_unfinished_saves(tmp_path):
    model, opt, _ = _setup()
    ck = Checkpointer(tmp_path, model=model, optimizer=opt, keep=2)
    for step in (10, 20, 30):
        ck.save(step)
    assert [s for s, _ in ck.checkpoints()] == [20, 30]
    # a save that died half way: a temporary directory, and a final-named one lacking files
    (tmp_path / ".tmp-ckpt-000000040-999999").mkdir()
    (tmp_path / "ckpt-000000050").mkdir()
    assert ck.latest().name == "ckpt-000000030"
    assert ck.resume()["step"] == 30


def test_finish_makes_next_run_start_fresh(tmp_path):
    model, opt, _ = _setup()
    ck = Checkpointer(tmp_path, model=model, optimizer=opt)
    ck.save(5)
    ck.finish(5)
    assert ck.resume() is None and ck.checkpoints() == []
    ck.save(1)
    assert ck.resume()["step"] == 1


def test_default_dir_from_capsule_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPSULE_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("CAPSULE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CAPSULE_PROJECT", "digits")
    monkeypatch.setenv("CAPSULE_STAGE", "train")
    assert default_checkpoint_dir() == tmp_path / ".checkpoints" / "digits-train"
    monkeypatch.setenv("CAPSULE_CHECKPOINT_DIR", "/ck")
    assert str(default_checkpoint_dir()) == "/ck"


@pytest.mark.parametrize("device,bf16,req,want", [
    ("cuda", True, "auto", "bf16"), ("cuda", False, "auto", "fp16"), ("cpu", False, "auto", "fp32"),
    ("cpu", False, "bf16", "bf16"), ("cuda", True, "fp32", "fp32"),
])
def test_precision_choice(device, bf16, req, want):
    assert choose_mode(device, bf16_supported=bf16, requested=req) == want


def test_precision_rejects_unknown_and_cpu_runs_plain():
    with pytest.raises(ValueError, match="fp8"):
        choose_mode("cpu", bf16_supported=False, requested="fp8")
    amp = mixed_precision("cpu", "fp32")
    assert amp.scaler is None and amp.dtype is None
    with mixed_precision("cpu", "bf16").autocast():
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16


def test_single_process_without_torchrun(monkeypatch, tmp_path):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("CAPSULE_LOGS_DIR", str(tmp_path))
    info = init_distributed()
    assert (info.rank, info.world_size, info.distributed, info.device.type) == (0, 1, False, "cpu")
    assert (tmp_path / "pids" / "rank-0.pid").read_text().strip() == str(os.getpid())
    assert pick_backend(True) == "nccl" and pick_backend(False) == "gloo"


def test_preemption_flag_on_sigterm():
    p = Preemption()
    try:
        assert not p.preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.preempted() and p.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as e:
            p.exit()
        assert e.value.code == 75
    finally:
        p.restore()


def test_metrics_jsonl_rank0_only(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl", rank=0) as m:
        m.event("started", 0)
        m.log(10, loss=torch.tensor(0.5), acc=0.9)
    MetricsLogger(tmp_path / "other.jsonl", rank=1).log(1, x=1)
    rows = read_metrics(tmp_path / "m.jsonl")
    assert rows[0]["event"] == "started" and rows[1]["loss"] == 0.5 and rows[1]["step"] == 10
    assert not (tmp_path / "other.jsonl").exists()
    json.dumps(rows)


def test_public_api_is_pinned():
    import torchcapsule.train as t

    assert sorted(t.__all__) == sorted([
        "Checkpointer", "DistInfo", "MetricsLogger", "PREEMPTED_EXIT_CODE", "Precision", "Preemption",
        "barrier", "cleanup", "default_checkpoint_dir", "init_distributed", "mixed_precision",
        "read_metrics", "seed_everything", "unwrap"])
    from torchcapsule.launch.failure import PREEMPTED_EXIT_CODE as launch_code

    assert t.PREEMPTED_EXIT_CODE == launch_code == 75  # the runtime and the launcher agree
