"""Serving models:/NAME@ALIAS from a real MLflow store (embedded SQLite): the alias moves to a
new version (`capsule models promote`) and the running service switches to it."""
from __future__ import annotations

import time

import httpx
import pytest

from torchcapsule.serve.testing import write_mlp_dir

from ..conftest import missing_part, run_capsule
from ._serve import REPO, running_server

pytestmark = pytest.mark.integration

YAML = """name: digits
registry:
  model_name: digits
  promote:
    alias: champion
serve:
  model: models:/digits@champion
"""


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}


def test_alias_move_is_served_without_a_failed_request(tmp_path, monkeypatch):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")
    root = tmp_path / "proj"
    root.mkdir()
    (root / "capsule.yaml").write_text(YAML)
    write_mlp_dir(root / "models" / "v1", (64, 16, 10), seed=1, checksums=False)
    write_mlp_dir(root / "models" / "v2", (64, 24, 10), seed=2, checksums=False)
    for d in ("v1", "v2"):
        r = run_capsule("models", "register", "--model-dir", f"models/{d}", "--no-promote", cwd=root,
                        env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr
    r = run_capsule("models", "promote", "digits", "1", cwd=root, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr

    # the server finds the store through capsule.yaml (-f), not the environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with running_server("models:/digits@champion", "-f", str(root / "capsule.yaml"), "--reload-interval", "0.5",
                        tmp=root, ready_timeout=120) as s:
        seen = []
        with httpx.Client(base_url=s.url, timeout=10) as c:
            r = c.post("/v1/predict", json={"inputs": [0.5] * 64})
            assert r.status_code == 200 and r.headers["x-model-version"] == "1"
            info = c.get("/v1/models").json()
            assert info["source"] == "models:/digits@champion"
            # one cache entry for version 1, named by the registry's identity of it (issue 14)
            entries = list((root / ".capsule" / "serve-cache" / "digits").glob("1-*"))
            assert len(entries) == 1 and (entries[0] / "checksums.sha256").is_file(), entries
            r = run_capsule("models", "promote", "digits", "2", cwd=root, env=_env(), timeout=120)
            assert r.returncode == 0, r.stderr
            end = time.monotonic() + 60
            while time.monotonic() < end:
                r = c.post("/v1/predict", json={"inputs": [0.5] * 64})
                seen.append((r.status_code, r.headers.get("x-model-version")))
                if seen[-1][1] == "2":
                    break
                time.sleep(0.05)
        assert seen[-1] == (200, "2"), seen[-3:]
        assert {code for code, _ in seen} == {200}
        # the pipeline's serve stage: `capsule serve --smoke-test` with serve.model from capsule.yaml
        r = run_capsule("serve", "--smoke-test", cwd=root, env=_env(), timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "digits version 2" in r.stdout and "ok:" in r.stdout
