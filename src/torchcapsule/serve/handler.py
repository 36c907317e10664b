"""The handler contract: what a user writes to serve a model, and the default handler.

    class Handler:                                   # subclass torchcapsule.serve.Handler
        Request  = <msgspec.Struct subclass>         # body of POST /v1/predict (-> OpenAPI schema)
        Response = <msgspec.Struct subclass>         # one answer (-> OpenAPI schema)
        def setup(self, device): ...                 # once per model version: load weights
        def preprocess(self, request) -> Tensor      # one request -> one sample (no batch dim)
        def predict(self, batch) -> Tensor           # a stacked batch -> a batch of outputs
        def postprocess(self, output) -> Response    # one output row -> one Response

The server decodes and validates the JSON body against `Request` (422 names the field),
groups requests into batches, runs `predict` under torch.inference_mode on the chosen
device and answers each request with its own `Response`. `preprocess_batch` and
`postprocess_batch` are optional fast paths over a whole batch; their defaults loop over
the per-item methods. Raise `InputError` from `validate`/`preprocess` to answer 422.

`DefaultHandler` serves a model directory whose meta.json names `input_shape` (and
`labels` for a classifier) with no user code: {"inputs": [...]} -> {"label", "index",
"score", "scores"} (or {"outputs": [...]} without labels).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import msgspec

from ..errors import ConfigError
from ..registry.modeldir import DTYPES, ModelDir
from .loader import build_module


class InputError(ValueError):
    """A request the model cannot take; answered 422 with `field` and the message."""

    def __init__(self, message: str, field: str = "$") -> None:
        super().__init__(message)
        self.field = field


class Handler:
    """Base class of user handlers; see the module docstring for the contract."""

    Request: ClassVar[type[msgspec.Struct]]
    Response: ClassVar[type[msgspec.Struct]]

    def __init__(self, model: ModelDir) -> None:
        self.model_dir = model  # the version this instance serves
        self.meta = model.meta
        self.module = None
        self.device = None

    # --- the contract -----------------------------------------------------------------
    def setup(self, device) -> None:
        """Load the model onto `device`. The default builds model.py + model.safetensors."""
        import torch

        device = self.device = torch.device(device)
        self.module = self.load_model(device)

    def preprocess(self, request) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.preprocess(request) -> tensor")

    def predict(self, batch):
        return self.module(batch)

    def postprocess(self, output) -> msgspec.Struct:
        raise NotImplementedError(f"{type(self).__name__}.postprocess(output) -> Response")

    # --- optional hooks -----------------------------------------------------------------
    def validate(self, request) -> None:
        """Checks beyond the Request type, run before queueing; raise InputError."""

    def example(self):
        """A valid Request, used to warm each version up and by `capsule serve --smoke-test`."""
        return None

    def preprocess_batch(self, requests: list) -> Any:
        import torch

        return torch.stack([self.preprocess(r) for r in requests])

    def postprocess_batch(self, outputs) -> list:
        return [self.postprocess(o) for o in outputs]

    # --- helpers -----------------------------------------------------------------------
    def load_model(self, device):
        """model.py's factory + verified weights of this version, in eval mode on `device`."""
        return build_module(self.model_dir, device)


# ------------------------------------------------------------------------------ default


class Prediction(msgspec.Struct, kw_only=True):
    """A classifier's answer: the best label, its index and probability, all probabilities."""

    label: str
    index: int
    score: float
    scores: list[float]


class Outputs(msgspec.Struct):
    """A model without labels: its raw output row."""

    outputs: list[Any]


# The values each input dtype holds: a JSON number outside them (1e308 for float32, inf) would
# become inf in the tensor and null scores in the answer, so it is refused while decoding (422
# naming the element, and minimum/maximum in the OpenAPI schema).
DTYPE_RANGE: dict[str, tuple[float, float]] = {
    "float32": (-3.4028234663852886e38, 3.4028234663852886e38),
    "float16": (-65504.0, 65504.0),
    "bfloat16": (-3.3895313892515355e38, 3.3895313892515355e38),
    "float64": (-1.7976931348623157e308, 1.7976931348623157e308),
    "int64": (-(2**63), 2**63 - 1),
    "int32": (-(2**31), 2**31 - 1),
}


def _ranged(elem: type, dtype: str) -> Any:
    lo, hi = DTYPE_RANGE[dtype]
    return Annotated[elem, msgspec.Meta(ge=elem(lo), le=elem(hi))]


def _nested(elem: type, shape: tuple[int, ...]) -> Any:
    """list[list[...elem]] with exact lengths, so msgspec checks shape and type while decoding."""
    t: Any = elem
    for d in reversed(shape):
        t = Annotated[list[t], msgspec.Meta(min_length=d, max_length=d)]
    return t


class DefaultHandler(Handler):
    """Serves a model directory from its meta.json alone (input_shape, input_dtype, labels)."""

    def __init__(self, model: ModelDir) -> None:
        super().__init__(model)
        shape = model.input_shape
        if not shape:
            raise ConfigError(f"{model.path / 'meta.json'}: input_shape is missing; the default handler "
                              "needs it", hint="add \"input_shape\": [...] or pass --handler serve.py:Handler")
        self.shape = shape
        self.torch_dtype, elem = DTYPES[model.input_dtype]
        self.labels = model.labels
        # Nested lists of exactly input_shape: msgspec checks lengths and element types while
        # decoding, and the same type gives the OpenAPI schema (minItems/maxItems).
        inputs_t = _nested(_ranged(elem, model.input_dtype), shape)
        self.Request = msgspec.defstruct(  # type: ignore[misc]
            "PredictRequest", [("inputs", inputs_t)], forbid_unknown_fields=True)
        self.Response = Prediction if self.labels else Outputs  # type: ignore[misc]

    def setup(self, device) -> None:
        import numpy as np
        import torch

        super().setup(device)
        self._np_dtype = np.float32 if self.torch_dtype in ("float16", "bfloat16") else np.dtype(self.torch_dtype)
        self._dtype = getattr(torch, self.torch_dtype)

    def preprocess(self, request):
        return self.preprocess_batch([request])[0]

    def preprocess_batch(self, requests: list):
        import numpy as np
        import torch

        # numpy builds the batch from nested lists ~3x faster than torch.tensor(list)
        arr = np.array([r.inputs for r in requests], dtype=self._np_dtype)
        x = torch.from_numpy(arr)
        if x.dtype != self._dtype:
            x = x.to(self._dtype)
        return x.to(self.device, non_blocking=True) if self.device.type != "cpu" else x

    def predict(self, batch):
        out = self.module(batch)
        if self.labels:
            out = out.float().softmax(dim=-1)
        return out

    def postprocess(self, output):
        return self.postprocess_batch(output.unsqueeze(0))[0]

    def postprocess_batch(self, outputs) -> list:
        import torch

        if not bool(torch.isfinite(outputs).all()):
            # JSON has no inf/nan (they would be encoded as null, breaking the Response schema);
            # raised per batch, the runner retries one by one so only the culprit gets the 422
            raise InputError("the model's output for these inputs is not finite (inf or nan); "
                             "send values in the range the model was trained on", field="$.inputs")
        if not self.labels:
            return [Outputs(row) for row in outputs.cpu().tolist()]
        if outputs.shape[-1] != len(self.labels):
            raise RuntimeError(f"model returned {outputs.shape[-1]} scores for {len(self.labels)} labels")
        best = outputs.argmax(dim=-1).cpu().tolist()
        rows = outputs.cpu().tolist()
        labels = self.labels
        return [Prediction(label=labels[i], index=i, score=row[i], scores=row) for i, row in zip(best, rows)]

    def example(self):
        return self.Request(inputs=_zeros(self.shape, 0 if self.torch_dtype.startswith("int") else 0.0))


def _zeros(shape: tuple[int, ...], zero):
    if len(shape) == 1:
        return [zero] * shape[0]
    return [_zeros(shape[1:], zero) for _ in range(shape[0])]


# ------------------------------------------------------------------------------ loading


def load_handler_class(spec: str | None, base_dir: Path | None = None) -> type[Handler]:
    """'serve.py:Handler' (a file, relative to base_dir) or 'package.module:Class'; None -> default."""
    if not spec:
        return DefaultHandler
    target, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ConfigError(f"handler {spec!r}: expected FILE.py:Class or module:Class",
                          hint="e.g. serve.handler: serve.py:Handler")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"handler {spec!r}: {path} not found", hint="give the path to your handler file")
        mod_name = f"_capsule_handler_{path.stem}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module  # msgspec/typing resolve annotations through sys.modules
        mspec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(target)
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise ConfigError(f"handler {spec!r}: {attr} is not a subclass of torchcapsule.serve.Handler")
    return cls
