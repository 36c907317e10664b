"""The ASGI app: a lean raw-ASGI hot path for POST /v1/predict, FastAPI for the rest.

Why two layers: FastAPI + pydantic costs ~250 us of Python per request on these machines
(3-4k req/s at best, see docs/benchmarks.md), more than the batched forward itself.
So /v1/predict is handled here directly: read the body (413 past the limit), decode and
validate it with msgspec against the handler's Request type (400/422 naming the field),
queue it for the batcher (504 past the timeout; a full queue is refused earlier, by `screen`,
called from the HTTP protocol, see protocol.py) and write the encoded answer with the
x-model-version header. FastAPI serves /healthz, /readyz, /metrics,
/v1/models, /docs and an OpenAPI schema that includes /v1/predict, built from the same
msgspec types.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import msgspec

from ..config import Serve
from .batcher import Batcher, Closed, QueueFull
from .handler import Handler, InputError
from .metrics import Metrics
from .protocol import ANSWERED, PASS, RESERVED, RESERVED_KEY
from .reload import ErrorBody, Runner, VersionSource, Watcher, describe_failure, load_version

log = logging.getLogger("torchcapsule.serve")

PREDICT_PATH = "/v1/predict"
_PREDICT_TARGET = PREDICT_PATH.encode()


RETRY_AFTER = b"1"  # seconds, in the Retry-After header of a 503

_JSON = (b"content-type", b"application/json")
# A full queue's 503 also ends the connection: see protocol.py (a client re-sending at once must
# connect again, which paces it).
_FULL_HEADERS = [(b"retry-after", RETRY_AFTER), (b"connection", b"close")]
_encode_error = msgspec.json.Encoder().encode


def _msgspec_field(err: Exception) -> tuple[str, str | None]:
    """'Expected `float`, got `str` - at `$.inputs[3]`' -> (message, '$.inputs[3]')."""
    text = str(err)
    msg, sep, where = text.rpartition(" - at `")
    if sep and where.endswith("`"):
        return msg, where[:-1]
    return text, None


class ServeApp:
    def __init__(self, source: VersionSource, handler_cls: type[Handler], device,
                 settings: Serve = Serve()) -> None:
        self.source = source
        self.handler_cls = handler_cls
        self.device = device
        self.settings = settings
        self.current: Runner | None = None  # swapped atomically on reload (one assignment)
        self.failed: str | None = None  # why the first version could not be served
        self.draining = False  # SIGTERM received: finishing what was sent, then exiting
        self.on_fatal: Callable[[str], None] | None = None  # set by the server: exit on failure
        self.batcher = Batcher(self._process, max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                               timeout_s=settings.timeout_s, in_thread=settings.forward_thread,
                               on_batch=self._on_batch)
        self.metrics = Metrics(lambda: self.batcher.depth)
        self.watcher: Watcher | None = None
        self.events: list[dict] = []  # reload history, shown by /v1/models
        self._observe_batch = self.metrics.batch_size.observe
        self._admin = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Predict requests the protocol admitted (screen) whose body is not yet read and queued:
        # they count against max_queue, so one burst cannot admit more than the queue holds.
        self.reserved = 0
        self._full_answer: tuple[Runner | None, bytes] = (None, b"")  # the raw 503, per version

    # ------------------------------------------------------------------ admission
    def queue_full(self) -> bool:
        return self.batcher.depth + self.reserved >= self.settings.max_queue

    def screen(self, method: bytes, target: bytes, transport) -> int:
        """Asked by the HTTP protocol when a request head is complete, before any ASGI task or
        body read (protocol.limited_protocol): a predict request is refused here, written
        straight to the socket, when the queue is full, else it reserves its slot."""
        if method != b"POST" or (target != _PREDICT_TARGET and target.partition(b"?")[0] != _PREDICT_TARGET):
            return PASS
        if self.current is None or self.draining:
            return PASS  # the app's own answers (not loaded yet, shutting down)
        if not self.queue_full():
            self.reserved += 1
            return RESERVED
        t0 = time.perf_counter()
        runner, answer = self._full_answer
        if runner is not self.current:
            runner = self.current
            body = _encode_error(ErrorBody(detail=self._full_detail()))
            answer = b"".join([b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n",
                               b"content-length: %d\r\nretry-after: %s\r\n" % (len(body), RETRY_AFTER),
                               b"x-model-version: %s\r\nconnection: close\r\n\r\n" % runner.version_header, body])
            self._full_answer = (runner, answer)
        transport.write(answer)
        self.metrics.observe(503, time.perf_counter() - t0)
        return ANSWERED

    def _full_detail(self) -> str:
        return f"queue full ({self.settings.max_queue} requests waiting)"

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] == PREDICT_PATH:
                if scope["method"] == "POST":
                    return await self._predict(scope, receive, send)
                return await self._reply(send, 405, "use POST", extra=[(b"allow", b"POST")])
            if self._admin is None:
                self._admin = build_admin(self)
            return await self._admin(scope, receive, send)
        if kind == "lifespan":
            return await self._lifespan(receive, send)

    # ------------------------------------------------------------------ hot path
    async def _predict(self, scope, receive, send) -> None:
        t0 = time.perf_counter()
        if scope.get(RESERVED_KEY):  # screened by the protocol: its slot is held until queued
            try:
                queued = await self._read_and_queue(scope, receive, send, t0)
            finally:
                self.reserved -= 1
        elif self.queue_full():
            # Full (a request the protocol did not screen): answer before reading the body.
            return await self._reply(send, 503, self._full_detail(), t0=t0, extra=_FULL_HEADERS)
        else:
            queued = await self._read_and_queue(scope, receive, send, t0)
        if queued is None:
            return
        runner, future = queued
        try:
            result = await future
        except TimeoutError as e:
            return await self._reply(send, 504, str(e), t0=t0)
        except Closed as e:
            return await self._reply(send, 503, str(e), t0=t0)
        except InputError as e:
            return await self._reply(send, 422, str(e), field=e.field, t0=t0)
        except Exception as e:  # the model failed: a server error, logged by the runner
            return await self._reply(send, 500, f"model error: {type(e).__name__}", t0=t0)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [_JSON, (b"content-length", b"%d" % len(result)),
                                (b"x-model-version", runner.version_header)]})
        await send({"type": "http.response.body", "body": result})
        self.metrics.observe(200, time.perf_counter() - t0)

    async def _read_and_queue(self, scope, receive, send, t0: float):
        """Read, decode and validate the body, and queue it: (runner, future), or None once answered."""
        limit = self.settings.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    return await self._reply(send, 400, "content-length is not a number", t0=t0)
                if too_big:
                    return await self._reply(send, 413, f"body over the {limit} byte limit", t0=t0)
                break
        msg = await receive()
        body = msg.get("body", b"")
        if msg.get("more_body"):
            parts = [body]
            size = len(body)
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await self._reply(send, 413, f"body over the {limit} byte limit", t0=t0)
                parts.append(chunk)
                if not msg.get("more_body"):
                    break
            body = b"".join(parts)
        elif msg["type"] == "http.disconnect":
            return
        if len(body) > limit:  # a chunked body can arrive whole in one message
            return await self._reply(send, 413, f"body over the {limit} byte limit", t0=t0)
        runner = self.current
        if runner is None:
            return await self._reply(send, 503, "model not loaded yet", t0=t0,
                                     extra=[(b"retry-after", RETRY_AFTER)])
        try:
            request = runner.decoder.decode(body)
            runner.handler.validate(request)
        except msgspec.ValidationError as e:
            text, field = _msgspec_field(e)
            return await self._reply(send, 422, text, field=field, t0=t0)
        except msgspec.DecodeError as e:
            return await self._reply(send, 400, f"body is not valid JSON: {e}", t0=t0)
        except InputError as e:
            return await self._reply(send, 422, str(e), field=e.field, t0=t0)
        try:
            return runner, self.batcher.submit(runner, request)
        except QueueFull as e:
            await self._reply(send, 503, str(e), t0=t0, extra=_FULL_HEADERS)
        except Closed as e:
            await self._reply(send, 503, str(e), t0=t0)
        return None

    async def _reply(self, send, status: int, detail: str, *, field: str | None = None,
                     extra: list | None = None, t0: float | None = None) -> None:
        body = _encode_error(ErrorBody(detail=detail, field=field))
        headers = [_JSON, (b"content-length", b"%d" % len(body))]
        if self.current is not None:
            headers.append((b"x-model-version", self.current.version_header))
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": body})
        if t0 is not None:
            self.metrics.observe(status, time.perf_counter() - t0)

    def _process(self, runner: Runner, requests: list) -> list:
        return runner.process(requests)

    def _on_batch(self, n: int) -> None:
        self._observe_batch(n)

    # ------------------------------------------------------------------ lifecycle
    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                self.batcher.start()
                # Load in the background: /healthz answers at once, /readyz once warmed up.
                self._loop.create_task(self._load_first())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.watcher is not None:
                    self.watcher.stop()
                await self.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _load(self, key: str) -> Runner:
        return load_version(self.source, key, self.handler_cls, self.device,
                            warmup_batch=self.settings.max_batch_size)

    async def _load_first(self) -> None:
        try:
            key = await asyncio.to_thread(self.source.current)
            runner = await asyncio.to_thread(self._load, key)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - a model.py calling sys.exit() is a load failure
            self.failed = describe_failure(e)
            log.error("cannot serve %s: %s", self.source.uri, e)
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
            return
        self._publish_now(runner)
        # The long-lived objects (model, handler, app) are made: move them out of the GC's
        # sight so full collections under load scan almost nothing (they caused 100 ms p99s).
        gc.collect()
        gc.freeze()
        log.info("serving %s version %s on %s", runner.model.name, runner.version, self.device)
        if self.settings.reload_interval:  # resolved by the CLI; None or 0: never
            self.watcher = Watcher(self.source, self._load, self._publish, self._reject,
                                   self.settings.reload_interval, serving_key=key)
            self.watcher.start()

    def _publish(self, runner: Runner) -> None:  # from the watcher thread
        self._loop.call_soon_threadsafe(self._publish_now, runner)

    def _publish_now(self, runner: Runner) -> None:
        old = self.current
        self.current = runner  # the switch: requests decoded from now on go to `runner`
        self.metrics.set_model(runner.model.name, runner.version)
        if old is not None:
            self.metrics.reloads.labels("loaded").inc()
            self.events.append({"event": "loaded", "version": runner.version, "replaced": old.version,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            log.info("reload: now serving version %s (was %s)", runner.version, old.version)

    def _reject(self, key: str, why: str) -> None:  # from the watcher thread
        self.metrics.reloads.labels("rejected").inc()
        self.events.append({"event": "rejected", "key": key, "error": why,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    # ------------------------------------------------------------------ OpenAPI
    def openapi_components(self) -> tuple[dict, dict]:
        """{'request'|'response'|'error': $ref} and the component schemas, from the msgspec types."""
        runner = self.current
        owner = runner.handler if runner else self.handler_cls
        named = {k: t for k, t in (("request", getattr(owner, "Request", None)),
                                   ("response", getattr(owner, "Response", None)),
                                   ("error", ErrorBody)) if isinstance(t, type)}
        refs, components = msgspec.json.schema_components(list(named.values()),
                                                          ref_template="#/components/schemas/{name}")
        return dict(zip(named, refs)), components


def build_admin(app: ServeApp):
    """The FastAPI app for everything but the hot path."""
    from fastapi import FastAPI, Response
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse

    api = FastAPI(title="capsule serve", version="1", description="Batched PyTorch inference service.")

    @api.get("/healthz", summary="Alive: the process answers")
    def healthz() -> dict:
        return {"status": "alive"}

    @api.get("/readyz", summary="Ready: a model version is loaded and warmed up",
             responses={503: {"description": "Loading, or the model failed to load"}})
    def readyz():
        r = app.current
        if app.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if r is None:
            body = {"status": "failed" if app.failed else "loading", "error": app.failed}
            return JSONResponse(body, status_code=503)
        if app.watcher is not None and not app.watcher.alive:  # new versions would never arrive
            return JSONResponse({"status": "failed", "error": "the hot-reload watcher stopped",
                                 "version": r.version}, status_code=503)
        return {"status": "ready", "model": r.model.name, "version": r.version}

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics():
        return Response(app.metrics.render(), media_type=app.metrics.content_type)

    @api.get("/v1/models", summary="The model version loaded, and reload history")
    def models() -> dict:
        r = app.current
        return {"source": app.source.uri, "models": [r.describe()] if r else [],
                "reload_interval_s": app.settings.reload_interval or 0.0, "events": app.events[-20:]}

    def openapi() -> dict:
        if api.openapi_schema and app.current is not None:
            return api.openapi_schema
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        refs, components = app.openapi_components()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        err = {"content": {"application/json": {"schema": refs["error"]}}}
        responses = {
            "400": {"description": "Body is not valid JSON", **err},
            "413": {"description": f"Body over {app.settings.max_body_bytes} bytes", **err},
            "422": {"description": "Body does not match the request schema (field names where)", **err},
            "503": {"description": "Queue full or model not loaded; retry after Retry-After seconds", **err},
            "504": {"description": f"No answer within {app.settings.timeout_s:g} s", **err},
        }
        if "response" in refs:
            responses["200"] = {"description": "The prediction; header x-model-version names the version",
                                "content": {"application/json": {"schema": refs["response"]}}}
        op = {"summary": "Predict one request (batched with others on the server)", "operationId": "predict",
              "responses": responses}
        if "request" in refs:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs["request"]}}}
        schema["paths"][PREDICT_PATH] = {"post": op}
        if app.current is not None:
            api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api
