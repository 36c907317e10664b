"""MLflow "models from code" definition of a torchcapsule model (logged as a file, never pickled).

`register` logs THIS FILE as the pyfunc model, with three artifacts: the weights
(model.safetensors), the user's model.py (build_model) and meta.json. MLflow stores the file's
source text and, on `mlflow.pyfunc.load_model(...)`, executes it and calls `load_context`: nothing
in the stored model is unpickled. It needs only mlflow, torch and numpy (no torchcapsule, not even
the safetensors package: the format is read below, it is an 8-byte length, a JSON header and raw
little-endian tensor bytes).

This file is not imported by torchcapsule itself; it is data that MLflow runs.
"""
import importlib.util
import json
import struct
import sys

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

_DTYPES = {  # safetensors dtype name -> torch dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def read_safetensors(path):
    """state_dict from a .safetensors file, without pickle and without the safetensors package."""
    import torch

    with open(path, "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        raw = bytearray(body[start:end])  # a writable copy: frombuffer shares its memory
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if sys.byteorder != "little" and t.element_size() > 1:
            t = t.byteswap()
        out[name] = t.reshape(info["shape"]).clone()
    return out


class CapsuleModel(PythonModel):
    """build_model(**meta.kwargs) + the safetensors state_dict; predict returns class scores."""

    # MLflow inspects predict()'s type hints at class creation and warns when there are none
    # (a warning its log_model re-enables); the signature logged with the model (a float32
    # tensor of meta.input_shape) is what validates input here, so skip the hint machinery.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        a = context.artifacts
        with open(a["meta"]) as fh:
            self.meta = json.load(fh)
        spec = importlib.util.spec_from_file_location("capsule_user_model", a["model_code"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        factory = getattr(module, self.meta.get("factory", "build_model"))
        model = factory(**self.meta.get("kwargs", {}))
        model.load_state_dict(read_safetensors(a["weights"]))
        self.model = model.eval()
        self.input_shape = tuple(self.meta.get("input_shape") or ())
        self.dtype = getattr(torch, self.meta.get("input_dtype", "float32"))

    def predict(self, context, model_input, params=None):
        import torch

        x = np.asarray(model_input)
        t = torch.as_tensor(x).to(self.dtype)
        if self.input_shape:
            t = t.reshape(-1, *self.input_shape)
        with torch.inference_mode():
            return self.model(t).float().numpy()


mlflow.models.set_model(CapsuleModel())
