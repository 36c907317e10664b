"""`capsule ui`: MLflow's own UI on the project's store (no mlflow import here: it runs
`python -m mlflow server` as a child and stops it with the CLI)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .._util import free_port
from ..errors import RegistryError
from .store import artifact_root, is_remote, sqlite_path, tracking_uri

if TYPE_CHECKING:
    from ..config import Project


def server_argv(uri: str, artifacts: str | None, host: str, port: int) -> list[str]:
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts:
        # proxied artifacts (the default) read and write the store's own artifact folder
        argv += ["--artifacts-destination", artifacts]
    return argv


def _ready(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    return False


def serve(project: "Project", *, host: str = "127.0.0.1", port: int | None = 5000,
          echo: Callable[[str], None] = print, start_timeout_s: float | None = None) -> int:
    """Run the UI until Ctrl-C/SIGTERM (exit 0); a remote tracking server is printed instead."""
    uri = tracking_uri(project)
    if is_remote(uri):
        echo(f"MLflow UI: {uri} (the project's tracking server; `capsule ui` starts one only for "
             "the embedded store)")
        return 0
    if sqlite_path(uri) is None:
        raise RegistryError(f"registry.tracking_uri {uri}: `capsule ui` serves the embedded SQLite store "
                            "or prints a server's URL; start `mlflow server` on that store yourself")
    from . import tracking

    for note in tracking.catch_up(project.volume_path("logs"), uri, artifact_location=artifact_root(project)):
        echo(f"note: {note}")
    sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    port = free_port(host) if not port else port
    env = {**os.environ, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    log = Path(project.root / ".capsule" / "ui.log")
    with open(log, "a") as err:
        proc = subprocess.Popen(server_argv(uri, artifact_root(project), host, port), env=env,
                                stdout=err, stderr=err, start_new_session=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def stop(signum, frame):  # SIGTERM like Ctrl-C: stop the server's whole process group
        raise KeyboardInterrupt

    if start_timeout_s is None:  # MLflow's server takes seconds, minutes on a loaded machine
        start_timeout_s = float(os.environ.get("CAPSULE_UI_START_TIMEOUT", "600"))
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if not _ready(url, proc, start_timeout_s):
            code = proc.poll()
            raise RegistryError(f"the MLflow UI did not start on {host}:{port} (exit code {code}); "
                                f"see {log}; pick another port with --port N, or --port 0 for a free one")
        echo(f"MLflow UI: {url}  (store {uri}; Ctrl-C stops it)")
        proc.wait()
        raise RegistryError(f"the MLflow UI stopped on its own (exit code {proc.returncode}); see {log}")
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
            echo("MLflow UI stopped")
