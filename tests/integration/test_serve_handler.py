"""The example custom handler (examples/digits/serve.py) on a real server, and its smoke test."""
from __future__ import annotations

import httpx
import pytest

from torchcapsule.serve.testing import write_mlp_dir

from ..conftest import EXAMPLE, run_capsule
from ._serve import REPO, running_server

pytestmark = pytest.mark.integration
HANDLER = f"{EXAMPLE / 'serve.py'}:DigitsHandler"


def test_example_handler_serves_its_own_request_type(tmp_path):
    from sklearn.datasets import load_digits

    model = write_mlp_dir(tmp_path / "digits", (64, 64, 10), train_digits=True)
    X, y = load_digits(return_X_y=True)
    with running_server(model, "--handler", HANDLER, tmp=tmp_path) as s:
        hits = 0
        for i in range(20):
            image = X[i].astype(int).reshape(8, 8).tolist()
            r = httpx.post(s.url + "/v1/predict", json={"image": image})
            assert r.status_code == 200, r.text
            guesses = r.json()["guesses"]
            assert len(guesses) == 3 and guesses[0]["probability"] >= guesses[1]["probability"]
            hits += guesses[0]["digit"] == str(y[i])
        assert hits >= 15  # a briefly trained MLP gets most of them right
        bad = httpx.post(s.url + "/v1/predict", json={"image": [[17] * 8] * 8})
        assert bad.status_code == 422 and bad.json()["field"] == "$.image[0][0]"
        blank = httpx.post(s.url + "/v1/predict", json={"image": [[0] * 8] * 8})
        assert blank.status_code == 422 and blank.json() == {"detail": "the image is blank", "field": "$.image"}
        spec = httpx.get(s.url + "/openapi.json").json()
        assert {"DigitsRequest", "DigitsResponse", "Guess"} <= set(spec["components"]["schemas"])
        assert httpx.post(s.url + "/v1/predict", json={"image": X[0].astype(int).reshape(8, 8).tolist()}
                          ).status_code == 200


def test_smoke_test_with_custom_handler(tmp_path):
    model = write_mlp_dir(tmp_path / "digits", (64, 16, 10))
    r = run_capsule("serve", str(model), "--handler", HANDLER, "--smoke-test", cwd=tmp_path, timeout=180,
                    env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 requests" in r.stdout
