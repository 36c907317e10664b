"""The model registry: MLflow behind a small API.

    register(project, model_dir=None) -> ModelVersion   log + register the trained model directory
    promote(name, version, alias)                       point ALIAS at VERSION
    apply_rule(project, version) -> PromotionDecision   promote when capsule.yaml's rule holds
    resolve(uri) -> ModelVersion                        models:/NAME@ALIAS or models:/NAME/VERSION
    download(uri, dest) -> Path                         model directory, sha256 verified
    verify_model_dir(path)                              re-check a pulled directory (serve does)
    tracking_uri(project) -> str
    store_uri(project=, tracking_uri=) -> str           the store those functions use

Only `torchcapsule.registry.mlflow` imports mlflow, and only when one of these functions runs:
importing this package stays cheap (the CLI's --help imports it never, `list` only when it runs).
"""
from __future__ import annotations

import importlib
from typing import Any

from .types import ModelRef, ModelVersion, PromotionDecision, parse_model_uri

_LAZY = {
    "register": "mlflow", "promote": "mlflow", "apply_rule": "mlflow", "resolve": "mlflow",
    "download": "mlflow", "list_models": "mlflow", "list_versions": "mlflow", "store_uri": "mlflow",
    "tracking_uri": "store", "verify_model_dir": "checksums",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ModelRef", "ModelVersion", "PromotionDecision", "parse_model_uri",
    "register", "promote", "apply_rule", "resolve", "download", "list_models", "list_versions",
    "tracking_uri", "verify_model_dir", "store_uri",
]
