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


def _project_with_versions(tmp_path, monkeypatch, hidden: tuple[int, ...]):
    """A project whose embedded store holds one registered version per hidden size (1, 2, ...)."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")
    root = tmp_path / "proj"
    root.mkdir()
    (root / "capsule.yaml").write_text(YAML)
    for i, h in enumerate(hidden, 1):
        write_mlp_dir(root / "models" / f"v{i}", (64, h, 10), seed=i, checksums=False)
        r = run_capsule("models", "register", "--model-dir", f"models/v{i}", "--no-promote", cwd=root,
                        env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr
    # the server finds the store through capsule.yaml (-f), not the environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return root


def test_alias_move_is_served_without_a_failed_request(tmp_path, monkeypatch):
    root = _project_with_versions(tmp_path, monkeypatch, (16, 24))
    r = run_capsule("models", "promote", "digits", "1", cwd=root, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
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


def test_two_workers_on_an_empty_cache_download_once_and_a_killed_worker_comes_back(tmp_path, monkeypatch):
    """issue 14 item 4: both workers of `--workers 2` need the version; one downloads it under the
    cache lock, the other waits and reads the same entry. A worker killed later is started again."""
    import os
    import signal

    from torchcapsule import registry
    from torchcapsule.config import load_project
    from torchcapsule.serve.reload import cache_identity

    root = _project_with_versions(tmp_path, monkeypatch, (16,))
    cache = root / ".capsule" / "serve-cache" / "digits"
    project = load_project(root / "capsule.yaml")
    entry = f"1-{cache_identity(registry.store_uri(project=project), registry.resolve('models:/digits/1', project=project))}"
    # what a worker killed mid-download leaves: its partial copy and the pull's staging folder
    for stale in (f".{entry}.partial", f"..{entry}.partial.pull-x1"):
        (cache / stale).mkdir(parents=True)
        (cache / stale / "model.safetensors").write_bytes(b"half")

    def pids_answering(url: str, deadline_s: float) -> set[int]:
        """Worker pids seen answering version 1 on new connections (either worker takes one);
        a worker still loading answers 503 and is asked again."""
        seen: set[int] = set()
        end = time.monotonic() + deadline_s
        while len(seen) < 2 and time.monotonic() < end:
            with httpx.Client(base_url=url, timeout=10) as fresh:
                p = fresh.post("/v1/predict", json={"inputs": [0.5] * 64})
                if p.status_code == 503 and "not loaded yet" in p.text:
                    continue
                assert p.status_code == 200 and p.headers["x-model-version"] == "1", p.text
                seen.add(fresh.get("/v1/models").json()["models"][0]["pid"])
        return seen

    with running_server("models:/digits/1", "-f", str(root / "capsule.yaml"), "--workers", "2",
                        tmp=root, ready_timeout=180) as s:
        first = pids_answering(s.url, 120)
        assert len(first) == 2 and s.proc.pid not in first, first
        assert [p.name for p in cache.iterdir() if p.is_dir()] == [entry]  # one entry, no partial left
        assert s.output().count("serve cache: downloaded models:/digits/1") == 1, s.output()[-3000:]

        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        end = time.monotonic() + 120
        while "starting it again (1/3)" not in s.output():
            assert time.monotonic() < end and s.proc.poll() is None, s.output()[-3000:]
            time.sleep(0.1)
        again = pids_answering(s.url, 120)
        assert len(again) == 2 and killed not in again, (first, again)
        assert s.output().count("serve cache: downloaded") == 1  # the new worker read the cache
