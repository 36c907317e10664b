"""Hot reload on a real server: the published version moves (a symlink swap, as a deploy
would do it), the service loads it beside the old one and switches with no failed request;
broken or tampered versions are rejected while the old one keeps serving."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from torchcapsule.serve.testing import MLP_CODE, write_mlp_dir

from ._serve import broken_model, metric, running_server

pytestmark = pytest.mark.integration


def publish(link: Path, target: Path) -> None:
    """Point `link` at `target` atomically (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


class Traffic:
    """Keeps sending requests from 4 threads; records every status and version."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/v1/predict", json={"inputs": [0.25] * 64})
                    self.seen.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.TransportError as e:
                    self.seen.append((0, repr(e)))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def wait_for_version(self, version: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(v == version for _, v in self.seen[-20:]):
                return
            time.sleep(0.05)
        raise AssertionError(f"version {version} never served; last: {self.seen[-5:]}")


def wait_event(url: str, kind: str, count: int, timeout: float = 30) -> list[dict]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        events = [e for e in httpx.get(url + "/v1/models").json()["events"] if e["event"] == kind]
        if len(events) >= count:
            return events
        time.sleep(0.1)
    raise AssertionError(f"no {count} '{kind}' reload events within {timeout}s")


def test_reload_switches_versions_without_a_failed_request(tmp_path):
    versions = tmp_path / "versions"
    v1 = write_mlp_dir(versions / "1", (64, 16, 10), version="1", seed=1)
    v2 = write_mlp_dir(versions / "2", (64, 32, 10), version="2", seed=2)
    broken = broken_model(versions / "3-broken", version="3")
    tampered = write_mlp_dir(versions / "4-tampered", (64, 16, 10), version="4", seed=4)
    (tampered / "model.safetensors").write_bytes((v1 / "model.safetensors").read_bytes())
    v5 = write_mlp_dir(versions / "5", (64, 16, 10), version="5", seed=5)
    current = tmp_path / "current"
    publish(current, v1)

    with running_server(current, "--reload-interval", "0.2", tmp=tmp_path) as s, Traffic(s.url) as traffic:
        traffic.wait_for_version("1")
        publish(current, v2)  # a new version: loaded beside v1, then switched to
        traffic.wait_for_version("2")

        publish(current, broken)  # fails its warm-up: rejected, v2 keeps serving
        rejected = wait_event(s.url, "rejected", 1)
        assert "broken on purpose" in rejected[0]["error"]
        publish(current, tampered)  # weights do not match meta.json's checksum
        rejected = wait_event(s.url, "rejected", 2)
        assert "sha256 mismatch" in rejected[1]["error"]
        time.sleep(0.5)
        assert {v for _, v in traffic.seen[-20:]} == {"2"}
        assert httpx.get(s.url + "/readyz").json()["version"] == "2"

        publish(current, v5)
        traffic.wait_for_version("5")
        time.sleep(0.2)

    statuses = {code for code, _ in traffic.seen}
    assert statuses == {200}, [x for x in traffic.seen if x[0] != 200][:5]
    order = [v for _, v in traffic.seen]
    # versions only move forward: never an answer from an older version after a newer one
    firsts = {v: order.index(v) for v in ("1", "2", "5")}
    lasts = {v: len(order) - 1 - order[::-1].index(v) for v in ("1", "2", "5")}
    assert lasts["1"] < firsts["5"] and lasts["2"] < firsts["5"] + 8 and firsts["1"] < firsts["2"]
    assert len(traffic.seen) > 50


def test_reload_metrics_and_models_endpoint(tmp_path):
    v1 = write_mlp_dir(tmp_path / "v" / "a", (64, 8, 10), version="a")
    v2 = write_mlp_dir(tmp_path / "v" / "b", (64, 8, 10), version="b")
    current = tmp_path / "current"
    publish(current, v1)
    with running_server(current, "--reload-interval", "0.2", tmp=tmp_path) as s:
        publish(current, v2)
        loaded = wait_event(s.url, "loaded", 1)
        assert loaded[0]["version"] == "b" and loaded[0]["replaced"] == "a"
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, 'capsule_model_reloads_total{result="loaded"}') == 1
        assert 'capsule_model_info{name="digits",version="b"} 1.0' in text
        assert 'version="a"' not in text
        assert httpx.get(s.url + "/v1/models").json()["models"][0]["version"] == "b"


EXITING_CODE = MLP_CODE + "\nimport sys\nsys.exit(3)  # a hostile or careless model.py\n"


def test_a_model_that_calls_sys_exit_cannot_end_hot_reload(tmp_path):
    """Issue 14 item 1: it used to kill the watcher thread silently (/readyz stayed 200)."""
    v1 = write_mlp_dir(tmp_path / "v" / "1", (64, 8, 10), version="1")
    bad = write_mlp_dir(tmp_path / "v" / "2", (64, 8, 10), version="2", code=EXITING_CODE)
    v3 = write_mlp_dir(tmp_path / "v" / "3", (64, 8, 10), version="3")
    current = tmp_path / "current"
    publish(current, v1)
    with running_server(current, "--reload-interval", "0.2", tmp=tmp_path) as s:
        publish(current, bad)
        rejected = wait_event(s.url, "rejected", 1)
        assert "sys.exit(3)" in rejected[0]["error"]
        assert metric(httpx.get(s.url + "/metrics").text, 'capsule_model_reloads_total{result="rejected"}') == 1
        assert "sys.exit(3)" in s.output()  # logged
        ready = httpx.get(s.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["version"] == "1"
        publish(current, v1)  # the rollback: still serving 1, the watcher still polling
        publish(current, v3)  # a good version after the bad one is picked up
        loaded = wait_event(s.url, "loaded", 1)
        assert loaded[0]["version"] == "3"
        assert httpx.post(s.url + "/v1/predict", json={"inputs": [0.1] * 64}).headers["x-model-version"] == "3"


def test_a_first_version_that_calls_sys_exit_is_a_one_line_failure(tmp_path):
    bad = write_mlp_dir(tmp_path / "bad", (64, 8, 10), version="1", code=EXITING_CODE)
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "serve", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "sys.exit(3)" in r.stderr and "Traceback" not in r.stderr
