"""The trained model directory (model.safetensors + model.py + meta.json): the one reader and its
checks, shared by `capsule models register`, `capsule models pull` and `capsule serve` (no torch,
no mlflow: the contract between the train stage, the registry and the service)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RegistryError
from .checksums import check_safetensors_header
from .types import META, MODEL_FILES, WEIGHTS

# meta.json "input_dtype" -> (torch dtype name, JSON element type)
DTYPES: dict[str, tuple[str, type]] = {
    "float32": ("float32", float), "float16": ("float16", float), "bfloat16": ("bfloat16", float),
    "float64": ("float64", float), "int64": ("int64", int), "int32": ("int32", int),
}
# meta.json keys whose JSON type is fixed (each optional)
_KINDS = {"kwargs": dict, "metrics": dict, "params": dict, "labels": list, "input_shape": list}


@dataclass(frozen=True)
class ModelDir:
    """One model version on disk, with its parsed metadata."""

    path: Path
    meta: dict[str, Any]
    version: str  # what /v1/models, the metric and the x-model-version header show
    source: str = ""  # the URI or directory the user named

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.meta.get("input_shape")
        return tuple(shape) if shape else None

    @property
    def input_dtype(self) -> str:
        return str(self.meta.get("input_dtype") or "float32")

    @property
    def labels(self) -> list[str] | None:
        labels = self.meta.get("labels")
        return [str(x) for x in labels] if labels else None


def read_model_dir(path: str | Path, *, version: str | None = None, source: str = "") -> ModelDir:
    """Check the directory's files, meta.json and weight format; one-line RegistryError (or
    IntegrityError for weights that are not safetensors) naming the file and the fix."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise RegistryError(f"{path}: no model directory there; run the train stage (`capsule run train`) "
                            f"or name a directory holding {', '.join(MODEL_FILES)}")
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise RegistryError(f"{path}: missing {', '.join(missing)}; a model directory holds "
                            f"{', '.join(MODEL_FILES)} (see docs/registry.md)")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path / META}: not valid JSON ({e}); rewrite it from the train stage") from None
    if not isinstance(meta, dict):
        raise RegistryError(f"{path / META}: expected a JSON object with kwargs, input_shape, metrics")
    for key, kind in _KINDS.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise RegistryError(f"{path / META}: '{key}' must be a JSON {kind.__name__}")
    shape = meta.get("input_shape")
    if shape is not None and (not shape or not all(type(d) is int and d > 0 for d in shape)):
        raise RegistryError(f"{path / META}: input_shape: {shape!r} is not a list of positive integers",
                            hint='e.g. "input_shape": [64]')
    if meta.get("input_dtype", "float32") not in DTYPES:
        raise RegistryError(f"{path / META}: input_dtype: {meta['input_dtype']!r} is not supported",
                            hint=f"allowed: {', '.join(DTYPES)}")
    check_safetensors_header(path / WEIGHTS)  # else safetensors says only "header too large"
    return ModelDir(path=path, meta=meta, version=str(version or meta.get("version") or path.name),
                    source=source or str(path))
