"""Write small model directories in the train stage's format (tests, benchmarks, examples).

The model.py written here is genuine: it imports only torch and defines build_model(**kwargs),
exactly like the one the train stage copies beside its weights.
"""
from __future__ import annotations

import json
from pathlib import Path

MLP_CODE = '''\
"""A plain MLP: sizes [in, hidden..., out] with ReLU between layers."""
import torch
from torch import nn


def build_model(sizes=(64, 32, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
'''


def write_mlp_dir(dest: str | Path, sizes=(64, 32, 10), *, name: str = "digits", version: str | None = None,
                  labels: list[str] | None = None, seed: int = 0, train_digits: bool = False,
                  code: str = MLP_CODE, checksums: bool = True, extra_meta: dict | None = None) -> Path:
    """An MLP model directory; `train_digits` fits it briefly on sklearn's digits (a few seconds)."""
    import torch
    from safetensors.torch import save_file

    from .._util import sha256_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.py").write_text(code)
    ns: dict = {}
    exec(compile(MLP_CODE, "model.py", "exec"), ns)
    torch.manual_seed(seed)
    model = ns["build_model"](sizes=list(sizes))
    metrics = {}
    if train_digits:
        metrics = _fit_digits(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "model.safetensors"))
    meta = {"name": name, "factory": "build_model", "kwargs": {"sizes": list(sizes)},
            "input_shape": [sizes[0]], "input_dtype": "float32",
            "labels": labels if labels is not None else [str(i) for i in range(sizes[-1])],
            "metrics": metrics, "torch": torch.__version__.split("+")[0]}
    if train_digits:
        meta["dataset"] = "sklearn.datasets.load_digits"
    if version is not None:
        meta["version"] = version
    if checksums:
        meta["checksums"] = {"model.safetensors": "sha256:" + sha256_file(dest / "model.safetensors")}
    meta.update(extra_meta or {})
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    return dest


def _fit_digits(model, epochs: int = 60) -> dict:
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    split = 1500
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[:split]), y[:split])
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(X[split:]).argmax(1) == y[split:]).float().mean().item()
    return {"accuracy": round(acc, 4)}
