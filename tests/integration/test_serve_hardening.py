"""Issue 14 against a real `capsule serve`: inputs outside the dtype's range and non-finite outputs
(422 naming the field), weights that are a pickle (one line naming the file)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import httpx
import pytest

from torchcapsule.serve.testing import MLP_CODE, write_mlp_dir

from ._serve import running_server

pytestmark = pytest.mark.integration

# A genuine model whose output overflows when the first input is large (finite in, inf out).
OVERFLOW_CODE = MLP_CODE + '''


class Overflow(nn.Sequential):
    def forward(self, x):
        y = super().forward(x)
        return torch.where(x[:, :1] > 100, y * float("inf"), y)


def build_overflow(sizes=(64, 32, 10)):
    return Overflow(*build_model(sizes))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-hard")
    model = write_mlp_dir(tmp / "m", (64, 16, 10), version="1", code=OVERFLOW_CODE,
                          extra_meta={"factory": "build_overflow"})
    with running_server(model, "--max-batch-size", "8", tmp=tmp, ready_timeout=180) as s:
        yield s


@pytest.mark.parametrize("value,field", [(1e308, "$.inputs[3]"), (-3.5e38, "$.inputs[3]")])
def test_inputs_outside_the_dtype_range_are_422_with_the_field(server, value, field):
    inputs = [0.5] * 64
    inputs[3] = value
    r = httpx.post(server.url + "/v1/predict", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_non_finite_output_is_422_and_spares_the_rest_of_its_batch(server):
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            bad = c.post("/v1/predict", json={"inputs": [1000.0] + [0.0] * 63})
            goods = [c.post("/v1/predict", json={"inputs": [0.25] * 64}) for _ in range(7)]
            return await asyncio.gather(bad, *goods)

    bad, *goods = asyncio.run(burst())
    assert bad.status_code == 422 and bad.json()["field"] == "$.inputs" and "not finite" in bad.json()["detail"]
    assert all(g.status_code == 200 and g.json()["score"] is not None for g in goods)


def test_openapi_states_the_value_range(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    text = json.dumps(schema["components"]["schemas"])
    assert "3.4028234663852886e+38" in text


def test_pickled_weights_name_the_file(tmp_path):
    model = write_mlp_dir(tmp_path / "m", (64, 8, 10), version="1", checksums=False)
    (model / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "serve", str(model), "--port", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "model.safetensors is not safetensors" in r.stderr and "pickle" in r.stderr


# -- item 8: request heads -------------------------------------------------------------------------
def _raw(server, data: bytes, *, timeout: float = 60) -> bytes:
    """Send `data` on a fresh connection, then read whatever the server answers until it closes."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_a_head_over_64_kib_is_431(server):
    assert _raw(server, HEAD + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    # unfinished: counted as it arrives
    assert _raw(server, HEAD + b"X-Big: " + b"a" * 100_000).startswith(b"HTTP/1.1 431 ")


def test_more_than_100_headers_is_431(server):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    assert _raw(server, HEAD + many + b"\r\n").startswith(b"HTTP/1.1 431 ")
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [0.5] * 64}, headers={f"x-h{i}": "v" for i in range(50)})
    assert r.status_code == 200  # 50 headers are fine


def test_an_endless_header_is_cut_off_early(server):
    """64 MiB of one unfinished header: the server stops reading after the limit (it used to keep it all)."""
    import socket

    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(HEAD + b"X-Big: ")
        block = b"a" * (1 << 20)
        try:
            while sent < 64 << 20:
                s.sendall(block)
                sent += len(block)
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    assert sent < 16 << 20, f"{sent >> 20} MiB accepted"


def test_a_head_that_never_completes_is_408(server):
    t0 = __import__("time").monotonic()
    answer = _raw(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # then silence (slowloris)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert __import__("time").monotonic() - t0 < 50

