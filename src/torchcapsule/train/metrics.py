"""Metrics as JSON lines in the logs volume: one object per line, {"step", "time", "event"?, ...}.

Only rank 0 writes (every rank would log the same reduced values). The file is appended to, so
a resumed run continues the same file after a `{"event": "resumed", "step": N}` line.

Tracking: when the launcher set $CAPSULE_TRACKING_URI (every `capsule run`), rank 0 also starts
a follower process (torchcapsule.registry.tracking) that sends the file's new lines to an MLflow
run in batches. The training step only writes its line: it never waits on the store, and a store
that is down just leaves the lines in the file for a later sync. close() does not wait for the
store either: the follower sends the tail in the background, and the launcher's catch-up after the
job (registry/tracking.catch_up_job) sends whatever it could not, without sending anything twice.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def default_metrics_path(stage: str | None = None) -> Path:
    logs = Path(os.environ.get("CAPSULE_LOGS_DIR", "logs"))
    stage = stage or os.environ.get("CAPSULE_STAGE", "train")
    return logs / f"metrics-{stage}.jsonl"


class MetricsLogger:
    def __init__(self, path: str | Path | None = None, *, rank: int | None = None,
                 tracking_uri: str | None = None, params: dict[str, Any] | None = None) -> None:
        """tracking_uri: the MLflow store (default $CAPSULE_TRACKING_URI; "" or
        $CAPSULE_TRACKING=off: none). params: logged as the run's params."""
        self.path = Path(path) if path is not None else default_metrics_path()
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._fh = None
        self._follower: subprocess.Popen | None = None
        self._fresh_store = False
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1)  # line-buffered: tail -f works
            uri = os.environ.get("CAPSULE_TRACKING_URI", "") if tracking_uri is None else tracking_uri
            if uri and os.environ.get("CAPSULE_TRACKING", "on") != "off":
                self._follower = self._start_follower(uri, params or {})

    def _start_follower(self, uri: str, params: dict[str, Any]) -> subprocess.Popen | None:
        try:
            context = json.loads(os.environ.get("CAPSULE_TRACKING_CONTEXT") or "{}")
        except ValueError:
            context = {}
        context.update({"world_size": int(os.environ.get("WORLD_SIZE", "1")),
                        "stage": os.environ.get("CAPSULE_STAGE", self.path.stem.removeprefix("metrics-"))})
        context.setdefault("command", " ".join([os.path.basename(sys.executable), *sys.argv]))
        if os.environ.get("CAPSULE_PROJECT"):
            context["project"] = os.environ["CAPSULE_PROJECT"]
        if params:
            context["params"] = {str(k): str(v) for k, v in params.items()}
        from ..registry.tracking import lowest_priority, write_context  # stdlib only: no mlflow here

        try:  # whichever sync opens the run (this follower, or the host's later) reads it
            write_context(self.path, context)
        except OSError:
            pass
        self._fresh_store = _fresh_sqlite(uri)
        argv = [sys.executable, "-m", "torchcapsule.registry.tracking", "follow", str(self.path),
                "--uri", uri, "--context", json.dumps(context, default=str)]
        if os.environ.get("CAPSULE_TRACKING_ARTIFACTS"):
            argv += ["--artifacts", os.environ["CAPSULE_TRACKING_ARTIFACTS"]]
        log = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".tracking.log")
        try:
            with open(log, "a") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=err, start_new_session=True)
        except OSError as e:  # no follower: the lines stay in the file for a later sync
            print(f"torchcapsule: metrics tracking not started ({e}); {self.path} keeps them", file=sys.stderr)
            return None
        lowest_priority(proc.pid)  # now, so its interpreter's start-up runs idle too
        atexit.register(self.close)  # Preemption.exit() and plain returns flush the follower too
        return proc

    def log(self, step: int, **values: Any) -> None:
        self._write({"step": step, "time": round(time.time(), 3), **values})

    def event(self, name: str, step: int, **values: Any) -> None:
        self._write({"event": name, "step": step, "time": round(time.time(), 3), **values})

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, default=_plain) + "\n")

    def close(self, flush_timeout_s: float | None = None) -> None:
        """Close the file and tell the follower the training ended (EOF on its stdin), without
        waiting for the store: the follower sends the tail in its own session, and the launcher's
        catch-up after the job (`capsule run`, `capsule pipeline run`) sends what it could not.

        The one wait: a follower creating a new embedded store (its first schema migration) gets
        up to $CAPSULE_TRACKING_FLUSH_TIMEOUT s (default 30), since a container or Slurm step that
        ends kills it and a half-migrated SQLite store would not open again. flush_timeout_s:
        wait that long for the follower's last sync in any case (a notebook with no launcher)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        proc, self._follower = self._follower, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # EOF: the follower does its last sync and exits
        if flush_timeout_s is None:
            flush_timeout_s = float(os.environ.get("CAPSULE_TRACKING_FLUSH_TIMEOUT", "30")) if self._fresh_store else 0.0
        if flush_timeout_s <= 0:
            return
        try:
            proc.wait(timeout=flush_timeout_s)
        except subprocess.TimeoutExpired:
            print(f"torchcapsule: metrics tracking still sending after {flush_timeout_s:.0f}s; it finishes in "
                  f"the background (pid {proc.pid}), and what it cannot send waits in {self.path}",
                  file=sys.stderr)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fresh_sqlite(uri: str) -> bool:
    """An embedded store the follower would create (no file yet): its migrations must not be cut."""
    from ..registry.store import sqlite_path

    db = sqlite_path(uri)
    try:
        return db is not None and db.stat().st_size == 0
    except OSError:
        return True


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(v: Any) -> Any:
    item = getattr(v, "item", None)  # tensors and numpy scalars
    return item() if callable(item) else str(v)
