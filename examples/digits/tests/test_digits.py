"""Tests of the example's own code (the `test` stage runs them: `python -m pytest -q tests`)."""
from __future__ import annotations

import json

import torch

import data
import evaluate
import train
from model import build_model, preprocess


def test_split_is_deterministic_and_disjoint():
    a, b = data.split(0), data.split(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    xtr, ytr, xte, yte = a
    assert xtr.shape[1] == 64 and len(xtr) + len(xte) == 1797
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    train_rows = {tuple(r) for r in xtr.tolist()}
    # a few images in the set are duplicates of each other; the split itself must not overlap indices
    assert sum(tuple(r) in train_rows for r in xte.tolist()) < 0.05 * len(xte)


def test_model_shapes_and_preprocess_range():
    model = build_model(hidden=16)
    x = preprocess(torch.full((3, 64), 16))
    assert x.max().item() == 1.0
    assert model(x).shape == (3, 10)


def test_short_single_process_run_writes_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSULE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CAPSULE_LOGS_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("CAPSULE_PROJECT", "digits")
    monkeypatch.setenv("CAPSULE_TRACKING", "off")  # a unit test of the script, not a training to track
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    train.main(["--epochs", "5", "--hidden", "32", "--ckpt-every", "50"])
    out = tmp_path / "models" / "digits"
    meta = json.loads((out / "meta.json").read_text())
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.py", "meta.json"}
    assert meta["factory"] == "build_model" and meta["kwargs"]["hidden"] == 32
    assert meta["metrics"]["accuracy"] > 0.8 and meta["step"] > 0

    model, meta2 = evaluate.load_model_dir(out)
    result = evaluate.evaluate(model)
    assert abs(result["accuracy"] - meta["metrics"]["accuracy"]) < 1e-4
