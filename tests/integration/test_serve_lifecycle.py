"""A real server under overload (503 + Retry-After, before the body, with the probes still
answering; 504 past the timeout), SIGTERM with
requests in flight (all answered), the smoke test, and failure to start."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from torchcapsule.serve.testing import write_mlp_dir

from ..conftest import run_capsule
from ._serve import REPO, broken_model, held_model, metric, running_server, slow_model

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


def _wait_for(what, cond, deadline: float = 120) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        time.sleep(0.05)


def _read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer with a content-length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head, body


def test_a_full_queue_answers_503_without_the_body_and_the_probes_answer(tmp_path):
    """issue 14 item 6: one batch held running, one request queued (--max-queue 1): a request
    whose head announces a body that never comes is answered 503 (Retry-After, connection:
    close) all the same, counted in /metrics, and /healthz, /readyz and /metrics answer while
    the queue is still full; the held and queued requests are answered once released."""
    hold, entered = tmp_path / "hold", tmp_path / "entered"
    model = held_model(tmp_path / "held", hold, entered)
    body = {"inputs": [1.0] * 64}
    with running_server(model, "--max-batch-size", "1", "--max-queue", "1", "--forward-thread",
                        "--timeout", "300", tmp=tmp_path, ready_timeout=180) as s:
        entered.unlink()  # touched by the warm-up forward
        hold.touch()
        predict = s.url + "/v1/predict"
        with ThreadPoolExecutor(2) as pool:
            try:
                running = pool.submit(httpx.post, predict, json=body, timeout=300)
                _wait_for("the first request's forward to start", entered.exists)
                queued = pool.submit(httpx.post, predict, json=body, timeout=300)
                _wait_for("the second request to be queued",
                          lambda: metric(httpx.get(s.url + "/metrics").text, "capsule_queue_depth") == 1)
                with socket.create_connection(("127.0.0.1", s.port), timeout=120) as c:
                    c.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\ncontent-type: application/json\r\n"
                              b"content-length: 100000\r\n\r\n")  # and no body
                    head, answer = _read_answer(c)
                lines = head.lower().split(b"\r\n")
                assert lines[0].startswith(b"http/1.1 503"), head
                assert b"retry-after: 1" in lines and b"connection: close" in lines, head
                assert json.loads(answer) == {"detail": "queue full (1 requests waiting)"}
                assert httpx.get(s.url + "/healthz", timeout=60).status_code == 200
                assert httpx.get(s.url + "/readyz", timeout=60).json()["status"] == "ready"
                text = httpx.get(s.url + "/metrics", timeout=60).text
                assert metric(text, "capsule_queue_depth") == 1  # so all of the above came while full
                assert metric(text, 'capsule_requests_total{status="503"}') == 1
            finally:
                hold.unlink(missing_ok=True)
            assert running.result().status_code == 200 and queued.result().status_code == 200


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
    """SIGTERM while one batch runs (held on a file) and more requests wait: /readyz says draining,
    every request is answered 200, the server exits 0 and then accepts nothing. Each step waits on a
    state (the forward entered, the queue depth, the readyz answer), never on a sleep."""
    hold, entered = tmp_path / "hold", tmp_path / "entered"
    model = held_model(tmp_path / "held", hold, entered)
    with running_server(model, "--max-batch-size", "4", "--forward-thread", "--timeout", "300",
                        tmp=tmp_path, ready_timeout=180) as s:
        entered.unlink()  # touched by the warm-up forward
        hold.touch()

        async def scenario():
            burst = asyncio.create_task(_burst(s.url, 12, timeout=300))
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                async def queued() -> bool:
                    return metric((await c.get("/metrics")).text, "capsule_queue_depth") >= 1
                end = time.monotonic() + 120
                while not (entered.exists() and await queued()):  # one batch held, others waiting
                    assert time.monotonic() < end, "the burst never filled a batch and the queue"
                    await asyncio.sleep(0.05)
                s.proc.send_signal(15)
                while (ready := await c.get("/readyz")).status_code == 200:  # until it saw the signal
                    assert time.monotonic() < end + 120, "/readyz never said draining"
                    await asyncio.sleep(0.05)
            hold.unlink()  # the drain waits for the queue, however long the batches take
            return await burst, ready

        answers, ready = asyncio.run(scenario())
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert [a.status_code for a in answers] == [200] * 12
        assert s.proc.wait(60) == 0
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
