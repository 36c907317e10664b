"""Model versions: where they come from, how one is loaded and warmed up, and the watcher.

A VersionSource answers two questions: which version should serve now (`current()`, cheap,
polled) and where that version's directory is (`fetch()`). LocalSource follows a directory,
a symlink to one (move the link to publish a version) or a directory holding a CURRENT file
naming a sub-directory. RegistrySource follows models:/NAME@ALIAS through torchcapsule.registry
(imported lazily: it is the only module that imports mlflow).

`load_version` builds a Runner (handler + decoder + encoder) and warms it up with a real
batch; the Watcher polls the source in a thread, loads a new version beside the old one and
hands it to the app, which switches with one assignment. A version that fails to load or to
warm up is recorded as rejected and the old one keeps serving.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..errors import CapsuleError, IntegrityError, ServeError
from ..registry.modeldir import ModelDir, read_model_dir
from ..registry.types import META
from .handler import Handler, InputError

log = logging.getLogger("torchcapsule.serve")


# ------------------------------------------------------------------------------ sources


class VersionSource(ABC):
    uri: str

    @abstractmethod
    def current(self) -> str:
        """An id of the version that should serve now; a change triggers a reload."""

    @abstractmethod
    def fetch(self, key: str) -> ModelDir:
        """The model directory of version `key` (downloaded if needed)."""


class LocalSource(VersionSource):
    """A local model directory, a symlink to one, or a directory with a CURRENT pointer file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self.uri = str(self.path)

    def _target(self) -> Path:
        pointer = self.path / "CURRENT"
        if pointer.is_file():
            return (self.path / pointer.read_text().strip()).resolve()
        return self.path.resolve()

    def current(self) -> str:
        target = self._target()
        # mtimes make an in-place rewrite (a re-trained model in the same folder) a new version
        stamp = [(target / n).stat().st_mtime_ns if (target / n).exists() else 0
                 for n in ("meta.json", "model.safetensors")]
        return f"{target}|{stamp[0]}|{stamp[1]}"

    def fetch(self, key: str) -> ModelDir:
        target = Path(key.split("|", 1)[0])
        return read_model_dir(target, source=self.uri)


class RegistrySource(VersionSource):
    """models:/NAME@ALIAS or models:/NAME/VERSION through torchcapsule.registry."""

    def __init__(self, uri: str, cache_dir: Path, project_file: Path | None = None) -> None:
        self.uri = uri
        self.cache_dir = Path(cache_dir)
        self.project_file = project_file  # capsule.yaml: its registry.tracking_uri, else the env's
        self._project = None
        body = uri[len("models:/"):]
        self.name = body.split("@", 1)[0].split("/", 1)[0]
        if not self.name:
            raise ServeError(f"{uri}: no model name", hint="use models:/NAME@ALIAS or models:/NAME/VERSION")

    def _kw(self) -> dict:
        if self.project_file is not None and self._project is None:
            from ..config import load_project

            self._project = load_project(self.project_file)
        return {"project": self._project}

    def current(self) -> str:
        from .. import registry  # lazy: imports mlflow

        return str(registry.resolve(self.uri, **self._kw()).version)

    def fetch(self, key: str) -> ModelDir:
        """The cached copy of version `key`, downloaded once (a lock across workers).

        The cache entry is named by the registry's identity of the version (tracking URI, run id,
        source), not by name and number alone: a new store or another tracking server that
        numbers a different model 1 gets its own entry. A hit is verified against the sha256
        tags the registry recorded, never against the cache's own checksums file."""
        from .. import registry
        from ..registry import checksums as cks
        from ..registry.store import file_lock

        kw = self._kw()
        mv = registry.resolve(f"models:/{self.name}/{key}", **kw)
        dest = self.cache_dir / self.name / f"{key}-{cache_identity(registry.store_uri(**kw), mv)}"
        lock = dest.with_name(f".{dest.name}.lock")
        with file_lock(lock, CACHE_LOCK_TIMEOUT_S, f"{lock}: another worker held the download lock for "
                       f"over {CACHE_LOCK_TIMEOUT_S:.0f}s; remove {dest.parent} if no server is running"):
            if (dest / META).is_file():
                try:
                    cks.verify(dest, mv.checksums, origin=f"serve cache of {mv.uri}")
                except IntegrityError as e:
                    log.warning("serve cache: %s; downloading it again", e)
                    shutil.rmtree(dest)
            if not (dest / META).is_file():
                # download beside the cache entry, then rename: a half download is never served.
                # One name will do (the lock admits one writer); what a holder killed mid-download
                # left (its partial copy, the pull's staging "..NAME.partial.pull-*") goes first.
                tmp = dest.with_name(f".{dest.name}.partial")
                for stale in dest.parent.glob(f".*{dest.name}.partial*"):
                    shutil.rmtree(stale, ignore_errors=True)
                try:
                    registry.download(mv.uri, tmp, **kw)  # verifies every sha256
                    shutil.rmtree(dest, ignore_errors=True)
                    tmp.rename(dest)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info("serve cache: downloaded %s into %s", mv.uri, dest)
        return read_model_dir(dest, version=key, source=self.uri)


CACHE_LOCK_TIMEOUT_S = 900.0  # one worker downloads; the others wait for it (large models: minutes)


def cache_identity(store: str, mv) -> str:
    """12 hex digits naming one registered version in one store."""
    import hashlib

    return hashlib.sha256(f"{store}\n{mv.run_id}\n{mv.source}".encode()).hexdigest()[:12]


def make_source(model: str, *, base_dir: Path | None = None, cache_dir: Path | None = None,
                project_file: Path | None = None) -> VersionSource:
    """MODEL as the user wrote it -> a source. Relative directories are taken from base_dir."""
    if model.startswith("models:/"):
        return RegistrySource(model, cache_dir or Path(".capsule/serve-cache"), project_file)
    path = Path(model)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise ServeError(f"model {model!r}: {path} does not exist",
                         hint="pass models:/NAME@ALIAS, models:/NAME/VERSION or a model directory")
    return LocalSource(path)


# ------------------------------------------------------------------------------ runner


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Body of every 4xx/5xx answer."""

    detail: str
    field: str | None = None


@dataclass
class Runner:
    """One loaded model version: its handler and the codecs of its Request/Response types."""

    handler: Handler
    model: ModelDir
    key: str
    device: Any
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.decoder = msgspec.json.Decoder(self.handler.Request)
        self.encoder = msgspec.json.Encoder()
        self.version = self.model.version
        self.version_header = self.version.encode("latin-1", "replace")

    def process(self, requests: list) -> list:
        """One batched forward; returns encoded bodies, or exceptions per request."""
        import torch

        h = self.handler
        try:
            with torch.inference_mode():
                x = h.preprocess_batch(requests)
                y = h.predict(x)
                outs = h.postprocess_batch(y)
            if len(outs) != len(requests):
                raise RuntimeError(f"postprocess_batch returned {len(outs)} answers for {len(requests)} requests")
            enc = self.encoder.encode
            return [enc(o) for o in outs]
        except Exception as e:
            if len(requests) == 1:
                if not isinstance(e, InputError):
                    log.error("model %s failed on a request: %s", self.version,
                              "".join(traceback.format_exception_only(e)).strip())
                return [e]
            # Isolate the culprit: one bad request must not fail the others in its batch.
            return [self.process([r])[0] for r in requests]

    def describe(self) -> dict:
        m = self.model
        return {"name": m.name, "version": self.version, "source": m.source, "path": str(m.path),
                "device": str(self.device), "handler": f"{type(self.handler).__module__}.{type(self.handler).__qualname__}",
                "input_shape": list(m.input_shape) if m.input_shape else None, "labels": m.labels,
                "metrics": m.meta.get("metrics"), "pid": os.getpid(), "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


def load_version(source: VersionSource, key: str, handler_cls: type[Handler], device,
                 warmup_batch: int = 1) -> Runner:
    """Fetch, build, set up and warm up one version; raises on any failure."""
    model = source.fetch(key)
    handler = handler_cls(model)
    handler.setup(device)
    runner = Runner(handler=handler, model=model, key=key, device=device)
    example = handler.example()
    if example is not None:
        # Warm up through the whole path (decode -> batch -> forward -> encode) at 1 and at full size.
        body = msgspec.json.encode(example)
        for n in sorted({1, max(1, warmup_batch)}):
            req = runner.decoder.decode(body)
            handler.validate(req)
            out = runner.process([req] * n)
            bad = next((o for o in out if isinstance(o, BaseException)), None)
            if bad is not None:
                raise ServeError(f"version {model.version} failed its warm-up batch of {n}: "
                                 f"{type(bad).__name__}: {bad}")
    return runner


def resolve_device(spec: str):
    """'auto' -> cuda if available else cpu; otherwise torch.device(spec), checked."""
    import torch

    if spec in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ServeError(f"--device {spec!r} is not a torch device", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ServeError(f"--device {spec}: no CUDA device is visible", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ServeError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ------------------------------------------------------------------------------ watcher


class Watcher:
    """Polls a source every `interval` s in a daemon thread; loads new versions off the loop."""

    def __init__(self, source: VersionSource, load: Callable[[str], Runner],
                 publish: Callable[[Runner], None], reject: Callable[[str, str], None],
                 interval: float, serving_key: str) -> None:
        self.source = source
        self.load = load
        self.publish = publish
        self.reject = reject
        self.interval = interval
        self.serving_key = serving_key
        self.rejected: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capsule-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        """False once the thread has ended without stop(): /readyz then answers 503."""
        return self._stop.is_set() or not self._thread.ident or self._thread.is_alive()

    def check_once(self) -> str | None:
        """Load the current version if it is new; returns 'loaded', 'rejected' or None."""
        try:
            key = self.source.current()
        except Exception as e:  # registry unreachable: keep serving, try again later
            log.warning("reload: cannot resolve %s: %s", self.source.uri, e)
            return None
        if key == self.serving_key or key in self.rejected:
            return None
        try:
            runner = self.load(key)
        except BaseException as e:  # noqa: BLE001 - user code may sys.exit(): it must not end the watcher
            msg = describe_failure(e)
            self.rejected[key] = msg
            log.error("reload: rejected %s (%s); the old version keeps serving", key, msg)
            self.reject(key, msg)
            return "rejected"
        self.serving_key = key
        self.publish(runner)
        return "loaded"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except BaseException as e:  # noqa: BLE001 - a bug here must not end hot reload silently
                log.exception("reload: check failed (%s); trying again in %gs", describe_failure(e), self.interval)


def describe_failure(e: BaseException) -> str:
    """One line for a load failure, including what user code does to end a process."""
    if isinstance(e, CapsuleError):
        return str(e)
    if isinstance(e, SystemExit):
        return f"the model code called sys.exit({e.code!r}) while loading; refused"
    if isinstance(e, KeyboardInterrupt):
        return "the model code raised KeyboardInterrupt while loading; refused"
    return f"{type(e).__name__}: {e}"
