"""Evaluate the trained model directory on the held-out split; write metrics to meta.json and logs."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

import data

HERE = Path(__file__).resolve().parent


def load_model_dir(model_dir: Path) -> tuple[torch.nn.Module, dict]:
    """Build the model from its own model.py and load the safetensors weights (no pickle)."""
    from safetensors.torch import load_model

    meta = json.loads((model_dir / "meta.json").read_text())
    spec = importlib.util.spec_from_file_location(f"_capsule_model_{meta['name']}", model_dir / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, meta["factory"])(**meta["kwargs"])
    load_model(model, str(model_dir / "model.safetensors"))
    return model.eval(), meta


@torch.no_grad()
def evaluate(model: torch.nn.Module, seed: int = 0) -> dict:
    from model import preprocess

    _, _, x, y = data.split(seed)
    pred = model(preprocess(x)).argmax(1)
    per_class = {str(c): round((pred[y == c] == c).float().mean().item(), 5) for c in range(10)}
    return {"accuracy": round((pred == y).float().mean().item(), 5), "n_test": len(y),
            "per_class_accuracy": per_class}


def main() -> int:
    name = os.environ.get("CAPSULE_PROJECT", "digits")
    models = Path(os.environ.get("CAPSULE_MODELS_DIR", HERE / "models"))
    logs = Path(os.environ.get("CAPSULE_LOGS_DIR", HERE / "logs"))
    model_dir = models / name
    if not (model_dir / "meta.json").is_file():
        print(f"error: no trained model in {model_dir}; run `capsule run train` first", file=sys.stderr)
        return 2
    model, meta = load_model_dir(model_dir)
    result = evaluate(model, seed=meta.get("params", {}).get("seed", 0))
    meta["metrics"] = {**meta.get("metrics", {}), "accuracy": result["accuracy"]}
    tmp = model_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, model_dir / "meta.json")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "metrics-evaluate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"accuracy {result['accuracy']:.4f} on {result['n_test']} held-out digits; wrote {logs / 'metrics-evaluate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
