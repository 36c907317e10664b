"""A real trained-model directory in the brief's format, for the registry tests: a tiny MLP
trained for a few steps on scikit-learn's bundled digits (no download), saved with safetensors."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

MODEL_PY = textwrap.dedent('''
    """The digits MLP: importable alone with only torch installed."""
    import torch.nn as nn


    def build_model(hidden=32, classes=10):
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))
''')

CAPSULE_YAML = textwrap.dedent('''
    name: digits
    registry:
      model_name: {model_name}
      promote:
        alias: champion
        rule: {rule}
''')


def write_project(root: Path, *, model_name: str = "digits",
                  rule: str = "accuracy >= 0.5 and accuracy >= champion.accuracy",
                  tracking_uri: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = CAPSULE_YAML.format(model_name=model_name, rule=rule)
    if tracking_uri:
        text = text.replace("registry:\n", f"registry:\n  tracking_uri: {tracking_uri}\n")
    (root / "capsule.yaml").write_text(text)
    return root / "capsule.yaml"


def train_model_dir(dest: Path, *, steps: int = 60, seed: int = 0, accuracy: float | None = None) -> Path:
    """Train a few steps, write model.safetensors + model.py + meta.json; returns dest."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.py").write_text(MODEL_PY)
    ns: dict = {}
    exec(compile(MODEL_PY, str(dest / "model.py"), "exec"), ns)
    torch.manual_seed(seed)
    model = ns["build_model"](hidden=32)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "model.safetensors"))
    meta = {
        "name": "digits", "factory": "build_model", "kwargs": {"hidden": 32},
        "input_shape": [64], "input_dtype": "float32", "labels": [str(i) for i in range(10)],
        "metrics": {"accuracy": acc if accuracy is None else accuracy, "loss": 0.1},
        "params": {"lr": 0.01, "steps": steps}, "torch": torch.__version__, "step": steps,
        "created_at": "2026-11-27T00:00:00Z",
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    np.save(dest.parent / f"{dest.name}-x.npy", (x[:5].numpy()).astype("float32"))
    return dest
