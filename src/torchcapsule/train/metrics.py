"""Metrics as JSON lines in the logs volume: one object per line, {"step", "time", "event"?, ...}.

Only rank 0 writes (every rank would log the same reduced values). The file is appended to, so
a resumed run continues the same file after a `{"event": "resumed", "step": N}` line.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def default_metrics_path(stage: str | None = None) -> Path:
    logs = Path(os.environ.get("CAPSULE_LOGS_DIR", "logs"))
    stage = stage or os.environ.get("CAPSULE_STAGE", "train")
    return logs / f"metrics-{stage}.jsonl"


class MetricsLogger:
    def __init__(self, path: str | Path | None = None, *, rank: int | None = None) -> None:
        self.path = Path(path) if path is not None else default_metrics_path()
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._fh = None
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1)  # line-buffered: tail -f works

    def log(self, step: int, **values: Any) -> None:
        self._write({"step": step, "time": round(time.time(), 3), **values})

    def event(self, name: str, step: int, **values: Any) -> None:
        self._write({"event": name, "step": step, "time": round(time.time(), 3), **values})

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, default=_plain) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(v: Any) -> Any:
    item = getattr(v, "item", None)  # tensors and numpy scalars
    return item() if callable(item) else str(v)
