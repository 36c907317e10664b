"""The ASGI app in-process (no socket): error mapping, limits and the OpenAPI schema,
driven with hand-made ASGI messages; the real-server behaviour is in tests/integration."""
from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from torchcapsule.config import Serve
from torchcapsule.serve.app import ServeApp, _msgspec_field
from torchcapsule.serve.handler import DefaultHandler
from torchcapsule.serve.protocol import ANSWERED, PASS, RESERVED, RESERVED_KEY
from torchcapsule.serve.reload import LocalSource, load_version
from torchcapsule.serve.testing import write_mlp_dir


def test_msgspec_error_split_into_message_and_field():
    assert _msgspec_field(msgspec.ValidationError("Expected `float`, got `str` - at `$.inputs[3]`")) == (
        "Expected `float`, got `str`", "$.inputs[3]")
    assert _msgspec_field(msgspec.ValidationError("Object missing required field `inputs`")) == (
        "Object missing required field `inputs`", None)


@pytest.fixture
def app(tmp_path):
    d = write_mlp_dir(tmp_path / "m", (64, 8, 10), version="9")
    src = LocalSource(d)
    a = ServeApp(src, DefaultHandler, "cpu", Serve(max_body_bytes=2000, max_queue=4))
    a.current = load_version(src, src.current(), DefaultHandler, "cpu")
    return a


def call(app: ServeApp, method: str, path: str, chunks: list[bytes], headers=()) -> tuple[int, dict, bytes]:
    """One HTTP exchange through the ASGI interface; returns status, headers, body."""
    async def main():
        app.batcher.start()
        inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                 for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return inbox.pop(0) if inbox else {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
        await app(scope, receive, send)
        await app.batcher.stop(drain_timeout=1)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], dict(start["headers"]), body

    return asyncio.run(main())


def test_predict_through_asgi(app):
    status, headers, body = call(app, "POST", "/v1/predict", [json.dumps({"inputs": [1.0] * 64}).encode()])
    assert status == 200 and headers[b"x-model-version"] == b"9"
    assert set(json.loads(body)) == {"label", "index", "score", "scores"}


def test_content_length_over_the_limit_is_refused_before_reading(app):
    status, _, body = call(app, "POST", "/v1/predict", [], headers=[(b"content-length", b"5000")])
    assert status == 413 and b"2000 byte limit" in body


def test_streamed_body_over_the_limit_is_413(app):
    status, _, _ = call(app, "POST", "/v1/predict", [b"[" * 1500, b"1" * 1500])
    assert status == 413


def test_bad_content_length_is_400(app):
    status, _, _ = call(app, "POST", "/v1/predict", [b"{}"], headers=[(b"content-length", b"abc")])
    assert status == 400


def test_wrong_method_is_405(app):
    status, headers, _ = call(app, "GET", "/v1/predict", [b""])
    assert status == 405 and headers[b"allow"] == b"POST"


def test_not_loaded_yet_is_503_with_retry_after(app):
    app.current = None
    status, headers, _ = call(app, "POST", "/v1/predict", [b"{}"])
    assert status == 503 and headers[b"retry-after"] == b"1"


def test_openapi_components_come_from_the_handler_types(app):
    refs, comps = app.openapi_components()
    assert refs["request"] == {"$ref": "#/components/schemas/PredictRequest"}
    assert comps["ErrorBody"]["required"] == ["detail"]
    assert comps["PredictRequest"]["properties"]["inputs"]["minItems"] == 64


def test_a_full_queue_answers_503_before_reading_the_body(tmp_path):
    """issue 14 item 6: at max_queue waiting requests the answer is 503 + Retry-After at once, the
    body never read; the queued requests are still answered. (A request the protocol did not
    screen; forward thread, so the 4 submitted stay queued until the batcher runs.)"""
    d = write_mlp_dir(tmp_path / "m", (64, 8, 10), version="9")
    src = LocalSource(d)
    app = ServeApp(src, DefaultHandler, "cpu", Serve(max_queue=4, forward_thread=True))
    app.current = load_version(src, src.current(), DefaultHandler, "cpu")

    async def main():
        app.batcher.start()
        request = app.current.decoder.decode(json.dumps({"inputs": [1.0] * 64}).encode())
        queued = [app.batcher.submit(app.current, request) for _ in range(4)]  # max_queue=4
        reads, sent = [], []

        async def receive():
            reads.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(msg):
            sent.append(msg)

        await app({"type": "http", "method": "POST", "path": "/v1/predict", "headers": []}, receive, send)
        answers = await asyncio.gather(*queued)
        await app.batcher.stop(drain_timeout=1)
        return sent, reads, answers

    sent, reads, answers = asyncio.run(main())
    start = sent[0]
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert b"queue full (4 requests waiting)" in sent[1]["body"] and reads == []
    assert all(set(json.loads(a)) == {"label", "index", "score", "scores"} for a in answers)


class Transport:
    def __init__(self):
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def test_screen_reserves_a_slot_per_admitted_request_then_answers_503_itself(app):
    """The protocol asks `screen` at each complete head: admitted predict requests hold a slot
    until queued (so one burst admits no more than max_queue), the rest get the 503 written
    straight to the transport, counted in the metrics; other routes are not its business."""
    t = Transport()
    assert app.screen(b"GET", b"/healthz", t) == PASS and app.screen(b"GET", b"/v1/predict", t) == PASS
    assert [app.screen(b"POST", b"/v1/predict", t) for _ in range(4)] == [RESERVED] * 4  # max_queue=4
    assert app.reserved == 4 and t.written == b""
    assert app.screen(b"POST", b"/v1/predict?x=1", t) == ANSWERED
    head, _, body = t.written.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert {b"retry-after: 1", b"connection: close", b"x-model-version: 9", b"content-length: %d" % len(body)} <= set(lines)
    assert json.loads(body) == {"detail": "queue full (4 requests waiting)"}
    assert app.screen(b"GET", b"/readyz", t) == PASS  # probes still go to the app when full
    assert 'capsule_requests_total{status="503"} 1.0' in app.metrics.render().decode()


def test_a_screened_request_releases_its_slot_whatever_its_answer(app):
    """Reserved slots come back when the request is queued or answered otherwise (422 here),
    else refused requests would shrink the queue for good."""
    ok = json.dumps({"inputs": [1.0] * 64}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": [], RESERVED_KEY: True}

    async def main():
        app.batcher.start()
        statuses = []
        for body in (ok, b'{"inputs": [1]}'):
            assert app.screen(b"POST", b"/v1/predict", Transport()) == RESERVED
            sent = []

            async def receive(body=body):
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(msg):
                sent.append(msg)

            await app(dict(scope), receive, send)
            statuses.append(sent[0]["status"])
        await app.batcher.stop(drain_timeout=1)
        return statuses

    assert asyncio.run(main()) == [200, 422]
    assert app.reserved == 0
