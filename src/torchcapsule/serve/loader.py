"""Read a trained model directory (model.safetensors + model.py + meta.json) and build its module.

The directory format is the train stage's contract (see docs/serving.md). Reading the
metadata is separate from building the module so the server can describe a version
(/v1/models, OpenAPI schema) and verify its checksums before any torch code runs.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util import sha256_file
from ..errors import IntegrityError, ServeError
# The model directory contract (file names, checksum listing) is the registry's: one definition.
from ..registry.checksums import check_safetensors_header, read_checksums
from ..registry.types import CODE, META, WEIGHTS

_module_ids = itertools.count()


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
        return tuple(int(d) for d in shape) if shape else None

    @property
    def input_dtype(self) -> str:
        return str(self.meta.get("input_dtype") or "float32")

    @property
    def labels(self) -> list[str] | None:
        labels = self.meta.get("labels")
        return [str(x) for x in labels] if labels else None


def read_model_dir(path: str | Path, *, version: str | None = None, source: str = "") -> ModelDir:
    """Parse meta.json and check the files exist; raises ServeError naming the file and the fix."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise ServeError(f"{path}: model directory not found",
                         hint="pass a directory holding model.safetensors, model.py and meta.json")
    for name in (WEIGHTS, CODE, META):
        if not (path / name).is_file():
            raise ServeError(f"{path}: {name} is missing",
                             hint="a model directory holds model.safetensors, model.py and meta.json")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise ServeError(f"{path / META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ServeError(f"{path / META}: must be a JSON object")
    shape = meta.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape
                              or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise ServeError(f"{path / META}: input_shape: {shape!r} is not a list of positive integers",
                         hint="e.g. \"input_shape\": [64]")
    if meta.get("input_dtype", "float32") not in DTYPES:
        raise ServeError(f"{path / META}: input_dtype: {meta['input_dtype']!r} is not supported",
                         hint=f"allowed: {', '.join(DTYPES)}")
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise ServeError(f"{path / META}: labels must be a list of strings")
    if version is None:
        version = str(meta.get("version") or path.name)
    return ModelDir(path=path, meta=meta, version=version, source=source or str(path))


# meta.json "input_dtype" -> (torch dtype name, JSON element type)
DTYPES: dict[str, tuple[str, type]] = {
    "float32": ("float32", float), "float16": ("float16", float), "bfloat16": ("bfloat16", float),
    "float64": ("float64", float), "int64": ("int64", int), "int32": ("int32", int),
}


def expected_checksums(model: ModelDir) -> dict[str, str]:
    """Recorded sha256s: checksums.sha256 (sha256sum format, written by `capsule models pull`
    and the registry's download) and/or meta.json {"checksums": {"model.safetensors": "sha256:<hex>"}}."""
    recorded = model.meta.get("checksums") or model.meta.get("sha256") or {}
    if isinstance(recorded, str):  # "sha256": "<hex>" for the weights alone
        recorded = {WEIGHTS: recorded}
    out = {str(k): str(v).removeprefix("sha256:").lower() for k, v in recorded.items()}
    out.update(read_checksums(model.path))
    return out


def verify_checksums(model: ModelDir) -> int:
    """Refuse a file whose sha256 differs from the recorded one; returns how many were checked."""
    checked = 0
    for name, want in expected_checksums(model).items():
        target = model.path / name
        if not target.is_file():
            raise IntegrityError(f"{target}: recorded in meta.json checksums but missing")
        got = sha256_file(target)
        if got != want:
            raise IntegrityError(
                f"{target}: sha256 {got[:12]}... does not match the recorded {want[:12]}...",
                hint="the file was changed after it was recorded; re-download or re-train the model")
        checked += 1
    return checked


def import_model_code(model: ModelDir):
    """Import this version's model.py under a unique name, so two versions can live side by side."""
    name = f"_capsule_model_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, model.path / CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_module(model: ModelDir, device):
    """model.py's factory(**kwargs) + the safetensors state_dict, on `device`, in eval mode."""
    import torch
    from safetensors.torch import load_file

    verify_checksums(model)
    code = import_model_code(model)
    factory_name = str(model.meta.get("factory") or "build_model")
    factory = getattr(code, factory_name, None)
    if not callable(factory):
        raise ServeError(f"{model.path / CODE}: defines no function {factory_name}()",
                         hint="meta.json 'factory' names the function that returns the nn.Module")
    module = factory(**(model.meta.get("kwargs") or {}))
    if not isinstance(module, torch.nn.Module):
        raise ServeError(f"{model.path / CODE}: {factory_name}() returned {type(module).__name__}, "
                         "not a torch.nn.Module")
    check_safetensors_header(model.path / WEIGHTS)  # else safetensors says only "header too large"
    state = load_file(str(model.path / WEIGHTS), device="cpu")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ServeError(f"{model.path / WEIGHTS}: does not fit {factory_name}(): "
                         f"{' '.join(first[:3])[:300]}") from None
    return module.to(device).eval()


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
