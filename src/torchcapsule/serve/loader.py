"""Build a model directory's module (model.py's factory + the safetensors weights), checksums first.

The directory itself is read and checked by registry/modeldir.py (one reader for register, pull
and serve); reading is separate from building so the server can describe a version (/v1/models,
OpenAPI schema) and verify its checksums before any torch code runs.
"""
from __future__ import annotations

import importlib.util
import itertools
import math

from ..errors import ServeError
# The model directory contract (files, meta.json, checksum listing) is the registry's: one definition.
from ..registry.checksums import check_files, read_checksums
from ..registry.modeldir import ModelDir
from ..registry.types import CODE, WEIGHTS

_module_ids = itertools.count()


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
    """Refuse a file whose sha256 differs from the recorded one; returns how many were checked.
    A directory with nothing recorded (a local, never registered model) has nothing to check."""
    return check_files(model.path, expected_checksums(model), origin="checksums recorded with the model")


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
