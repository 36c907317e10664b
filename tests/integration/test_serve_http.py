"""A real `capsule serve` on 127.0.0.1: answers, batching, probes, metrics, bad input (never 500)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from torchcapsule.serve.testing import write_mlp_dir

from ._serve import metric, running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-http")
    model = write_mlp_dir(tmp / "digits", (64, 32, 10), version="3")
    with running_server(model, "--max-batch-size", "16", "--max-body-bytes", "4096", tmp=tmp) as s:
        yield s


def test_predict_answers_with_label_and_version(server):
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [0.5] * 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-model-version"] == "3"
    assert body["label"] in [str(i) for i in range(10)] and body["label"] == str(body["index"])
    assert len(body["scores"]) == 10 and abs(sum(body["scores"]) - 1) < 1e-4
    assert body["score"] == max(body["scores"])


def test_concurrent_requests_are_batched(server):
    before = httpx.get(server.url + "/metrics").text

    async def burst():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as c:
            bodies = [{"inputs": [float(i % 7)] * 64} for i in range(400)]
            return await asyncio.gather(*(c.post("/v1/predict", json=b) for b in bodies))

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    # the same input gets the same answer whether it ran alone or in a batch
    solo = httpx.post(server.url + "/v1/predict", json={"inputs": [3.0] * 64}).json()
    batched = [a.json() for a in answers if json.loads(a.request.content)["inputs"][0] == 3.0]
    assert batched and all(b["label"] == solo["label"] for b in batched)
    assert all(abs(x - y) < 1e-5 for b in batched for x, y in zip(b["scores"], solo["scores"]))
    after = httpx.get(server.url + "/metrics").text
    batches = metric(after, "capsule_batch_size_count") - metric(before, "capsule_batch_size_count")
    samples = metric(after, "capsule_batch_size_sum") - metric(before, "capsule_batch_size_sum")
    assert samples == 401
    assert batches < samples, "no batch held more than one request under concurrent load"
    largest_bucket_used = [l for l in after.splitlines() if l.startswith('capsule_batch_size_bucket{le="1.0"}')]
    assert metric(after, "capsule_batch_size_count") > float(largest_bucket_used[0].split()[-1])
    assert 'capsule_requests_total{status="200"}' in after
    assert 'capsule_request_duration_seconds_bucket{le="0.005",status="200"}' in after
    assert 'capsule_model_info{name="digits",version="3"} 1.0' in after
    assert "capsule_queue_depth 0.0" in after


@pytest.mark.parametrize("body, status, field, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b'{"inputs": [1, 2, 3]}', 422, "$.inputs", "length >= 64"),
    (json.dumps({"inputs": [0.1] * 63 + ["x"]}).encode(), 422, "$.inputs[63]", "Expected `float`, got `str`"),
    (json.dumps({"inputs": [[0.1] * 64]}).encode(), 422, "$.inputs[0]", "Expected `float`, got `array`"),
    (json.dumps({"input": [0.1] * 64}).encode(), 422, None, "unknown field `input`"),
    (b"[]", 422, None, "Expected `object`"),
    (b"", 400, None, "not valid JSON"),
    (json.dumps({"inputs": [0.1] * 2000}).encode(), 413, None, "4096 byte limit"),
])
def test_bad_input_is_4xx_and_server_keeps_serving(server, body, status, field, words):
    r = httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert words in err["detail"]
    assert err.get("field") == field
    ok = httpx.post(server.url + "/v1/predict", json={"inputs": [0.5] * 64})
    assert ok.status_code == 200


def test_chunked_oversize_body_is_413(server):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(server.url + "/v1/predict", content=chunks())
    assert r.status_code == 413
    assert httpx.post(server.url + "/v1/predict", json={"inputs": [0.5] * 64}).status_code == 200


def test_probes_models_and_openapi(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == "3"
    models = httpx.get(server.url + "/v1/models").json()["models"]
    assert models[0]["name"] == "digits" and models[0]["input_shape"] == [64] and models[0]["device"] == "cpu"
    assert httpx.get(server.url + "/v1/predict").status_code == 405
    spec = httpx.get(server.url + "/openapi.json").json()
    op = spec["paths"]["/v1/predict"]["post"]
    req = spec["components"]["schemas"]["PredictRequest"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert req["properties"]["inputs"]["minItems"] == 64 and req["properties"]["inputs"]["maxItems"] == 64
    assert set(spec["components"]["schemas"]["Prediction"]["required"]) == {"label", "index", "score", "scores"}
    assert {"200", "413", "422", "503"} <= set(op["responses"])
    assert "/healthz" in spec["paths"] and "/metrics" in spec["paths"]


def test_capsule_yaml_serve_settings_reach_the_server_and_flags_override_them(tmp_path):
    model = write_mlp_dir(tmp_path / "digits", (64, 8, 10), version="1")
    (tmp_path / "capsule.yaml").write_text(
        "name: demo\nserve:\n  max_body_bytes: 3000\n  timeout_s: 7\n  reload_interval: 4\n")
    with running_server(model, "-f", str(tmp_path / "capsule.yaml"), "--timeout", "5", tmp=tmp_path) as s:
        responses = httpx.get(s.url + "/openapi.json").json()["paths"]["/v1/predict"]["post"]["responses"]
        assert responses["413"]["description"] == "Body over 3000 bytes"  # from capsule.yaml
        assert responses["504"]["description"] == "No answer within 5 s"  # the flag beats yaml's 7
        assert httpx.get(s.url + "/v1/models").json()["reload_interval_s"] == 4.0
        big = httpx.post(s.url + "/v1/predict", content=b"[" + b"1," * 1600 + b"1]")
        assert big.status_code == 413 and "3000 byte limit" in big.json()["detail"]
