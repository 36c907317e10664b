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
    with running_server(model, "--max-batch-size", "8", tmp=tmp) as s:
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

