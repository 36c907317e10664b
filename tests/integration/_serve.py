"""Helpers for the serve integration tests: real `capsule serve` processes on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from torchcapsule._util import free_port
from torchcapsule.serve.testing import MLP_CODE, write_mlp_dir

REPO = Path(__file__).resolve().parents[2]

# A genuine model.py whose forward can be slowed down (to fill queues) or broken (to fail warm-up).
SLOW_CODE = MLP_CODE + '''

import time as _time


class Slow(nn.Sequential):
    """The same layers (same state_dict keys), with a sleep per forward."""

    def __init__(self, inner, delay):
        super().__init__(*inner)
        self.delay = delay

    def forward(self, x):
        _time.sleep(self.delay)
        return super().forward(x)


def build_slow(sizes=(64, 32, 10), delay=0.05):
    return Slow(build_model(sizes), delay)
'''

# A forward held running for as long as a test needs: it touches `entered` when it starts and
# waits while the file `hold` exists (the test removes it), so "a batch is running and the queue
# is full" is a state the test creates and sees, not a timing.
HELD_CODE = MLP_CODE + '''

import os as _os
import time as _time


class Held(nn.Sequential):
    def __init__(self, inner, hold, entered):
        super().__init__(*inner)
        self.hold = hold
        self.entered = entered

    def forward(self, x):
        open(self.entered, "w").close()
        while _os.path.exists(self.hold):
            _time.sleep(0.01)
        return super().forward(x)


def build_held(sizes=(64, 32, 10), hold="", entered=""):
    return Held(build_model(sizes), hold, entered)
'''

BROKEN_CODE = MLP_CODE + '''


class Broken(nn.Sequential):
    def forward(self, x):
        raise RuntimeError("this version is broken on purpose")


def build_broken(sizes=(64, 32, 10)):
    return Broken(*build_model(sizes))
'''


def slow_model(dest: Path, delay: float, version: str = "slow") -> Path:
    d = write_mlp_dir(dest, version=version, code=SLOW_CODE)
    import json
    meta = json.loads((d / "meta.json").read_text())
    meta["factory"] = "build_slow"
    meta["kwargs"]["delay"] = delay
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def held_model(dest: Path, hold: Path, entered: Path) -> Path:
    import json
    d = write_mlp_dir(dest, version="held", code=HELD_CODE)
    meta = json.loads((d / "meta.json").read_text())
    meta["factory"] = "build_held"
    meta["kwargs"].update(hold=str(hold), entered=str(entered))
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def broken_model(dest: Path, version: str = "broken") -> Path:
    import json
    d = write_mlp_dir(dest, version=version, code=BROKEN_CODE)
    meta = json.loads((d / "meta.json").read_text())
    meta["factory"] = "build_broken"
    (d / "meta.json").write_text(json.dumps(meta))
    return d


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def running_server(model: str | Path, *args: str, tmp: Path, ready_timeout: float = 60):
    """Start `capsule serve MODEL --port P ARGS`, wait for /readyz, always stop it."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", "serve", str(model),
                                 "--port", str(port), "--threads", "1", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    server = Server(proc, port, log)
    try:
        end = time.monotonic() + ready_timeout
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{server.output()[-3000:]}"
            try:
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, f"not ready in {ready_timeout}s:\n{server.output()[-3000:]}"
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def metric(text: str, name: str) -> float:
    """The value of one sample line `name value` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
