"""A real server under overload (503 + Retry-After, 504 past the timeout), SIGTERM with
requests in flight (all answered), the smoke test, and failure to start."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from torchcapsule.serve.testing import write_mlp_dir

from ..conftest import run_capsule
from ._serve import REPO, broken_model, metric, running_server, slow_model

pytestmark = pytest.mark.integration


async def _burst(url: str, n: int, timeout: float = 30) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=n), timeout=timeout) as c:
        return await asyncio.gather(*(c.post("/v1/predict", json={"inputs": [1.0] * 64}) for _ in range(n)))


def test_overload_answers_503_with_retry_after(tmp_path):
    # 50 ms per batch of at most 1, at most 2 queued: 30 simultaneous requests cannot all wait.
    model = slow_model(tmp_path / "slow", delay=0.05)
    with running_server(model, "--max-batch-size", "1", "--max-queue", "2", tmp=tmp_path) as s:
        answers = asyncio.run(_burst(s.url, 30))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}, codes
        # at least the 2 that fit the queue are served; most of the burst is turned away
        assert codes.count(503) >= 10 and codes.count(200) >= 2, codes
        rejected = next(a for a in answers if a.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and "queue full" in rejected.json()["detail"]
        # it recovers: once the burst is over, requests are served again
        assert httpx.post(s.url + "/v1/predict", json={"inputs": [1.0] * 64}).status_code == 200
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, 'capsule_requests_total{status="503"}') == codes.count(503)


def test_request_timeout_answers_504(tmp_path):
    model = slow_model(tmp_path / "slow", delay=0.4)
    # --forward-thread: the event loop keeps reading requests during the 0.4 s forwards, so every
    # request's clock starts when it arrives (inline forwards would hold new reads back)
    with running_server(model, "--max-batch-size", "1", "--timeout", "0.5", "--forward-thread", tmp=tmp_path,
                        ready_timeout=90) as s:
        # 8 at once, 0.4 s each, one at a time: the later ones cannot start within 0.5 s
        answers = asyncio.run(_burst(s.url, 8))
        codes = sorted(a.status_code for a in answers)
        assert 504 in codes and codes[0] == 200, codes
        assert "no answer within 0.5 s" in next(a for a in answers if a.status_code == 504).json()["detail"]


def test_sigterm_finishes_requests_in_flight(tmp_path):
    model = slow_model(tmp_path / "slow", delay=0.3)
    with running_server(model, "--max-batch-size", "4", tmp=tmp_path) as s:
        async def scenario():
            burst = asyncio.create_task(_burst(s.url, 12))
            await asyncio.sleep(0.2)  # requests are queued / in a batch now
            s.proc.send_signal(15)
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient(base_url=s.url) as c:
                ready = await c.get("/readyz")  # accepted within the read grace: says draining
            answers = await burst
            return answers, ready

        answers, ready = asyncio.run(scenario())
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert [a.status_code for a in answers] == [200] * 12
        assert s.proc.wait(30) == 0
        # and it no longer accepts
        with pytest.raises(httpx.TransportError):
            httpx.post(s.url + "/v1/predict", json={"inputs": [1.0] * 64}, timeout=2)


def test_smoke_test_passes_on_trained_digits(tmp_path):
    model = write_mlp_dir(tmp_path / "digits", (64, 64, 10), train_digits=True)
    r = run_capsule("serve", str(model), "--smoke-test", cwd=tmp_path, timeout=180,
                    env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "real sklearn digits:" in r.stdout and "ok:" in r.stdout


def test_smoke_test_reads_capsule_yaml(tmp_path):
    write_mlp_dir(tmp_path / "models" / "digits", (64, 16, 10))
    (tmp_path / "capsule.yaml").write_text("name: digits\nserve:\n  model: models/digits\n  max_batch_size: 8\n")
    r = run_capsule("serve", "--smoke-test", cwd=tmp_path, timeout=180, env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "version digits" in r.stdout


def test_a_model_that_fails_warm_up_stops_the_server_with_an_error(tmp_path):
    model = broken_model(tmp_path / "broken")
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "serve", str(model), "--port", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not serve") and "warm-up" in last and "broken on purpose" in last


def test_missing_model_is_one_line_error(tmp_path):
    r = run_capsule("serve", str(tmp_path / "nope"), cwd=tmp_path, env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: model ") and "does not exist" in r.stderr


def test_tampered_weights_are_refused(tmp_path):
    model = write_mlp_dir(tmp_path / "m", (64, 8, 10))
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))
    t0 = time.monotonic()
    r = run_capsule("serve", str(model), "--port", "0", cwd=tmp_path, timeout=120,
                    env={"PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60


def test_workers_share_the_port_and_stop_on_sigterm(tmp_path):
    model = write_mlp_dir(tmp_path / "m", (64, 8, 10))
    with running_server(model, "--workers", "2", tmp=tmp_path, ready_timeout=90) as s:
        pids = set()
        end = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < end:  # new connections reach either worker
            with httpx.Client(base_url=s.url) as c:
                assert c.post("/v1/predict", json={"inputs": [1.0] * 64}).status_code == 200
                pids.add(c.get("/v1/models").json()["models"][0]["pid"])
        assert len(pids) == 2 and s.proc.pid not in pids
        assert s.stop() == 0
    for pid in pids:  # the workers are gone too
        try:
            import os
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} still running")
