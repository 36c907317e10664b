"""What a finished stage left behind, read from its files: its key metric (the progress view's
metric column) and the model version it reported. Plain reads, no rich, no MLflow."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Metric names shown in the progress view, best first; otherwise the first number found.
_METRIC_PREFERENCE = ("accuracy", "val_accuracy", "acc", "f1", "auc", "val_loss", "loss")
_MODEL_URI = re.compile(r"models:/([A-Za-z0-9_.-]+)/(\d+)")


def written_since(p: Path, since: float | None) -> bool:
    """Written by this attempt (a file left by an earlier run says nothing about this one)."""
    try:
        return since is None or p.stat().st_mtime >= since - 0.1  # file times are a few ms coarse
    except OSError:
        return False


def key_metric(logs: Path, stage: str, since: float | None = None) -> dict[str, float] | None:
    """{name: value} from logs/metrics-<stage>.json, or the last line of a metrics .jsonl."""
    data: Any = None
    p = logs / f"metrics-{stage}.json"
    if written_since(p, since):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            pass
    if data is None:
        for p in (logs / f"metrics-{stage}.jsonl", logs / stage / "metrics.jsonl", logs / f"{stage}.jsonl"):
            if not written_since(p, since):
                continue
            try:
                lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
                data = json.loads(lines[-1]) if lines else None
            except (OSError, ValueError):
                continue
            if data is not None:
                break
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        return None
    nums = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in _METRIC_PREFERENCE:
        if k in nums:
            return {k: float(nums[k])}
    for k, v in nums.items():
        if k not in ("step", "epoch", "rank", "time", "timestamp"):
            return {k: float(v)}
    return None


def model_version_from(lines: list[str], outputs_file: Path) -> str | None:
    """models:/NAME/VERSION a stage reported: in its outputs file, else the last one its log printed."""
    try:
        v = json.loads(outputs_file.read_text()).get("model_version")
        if v:
            return str(v)
    except (OSError, ValueError, AttributeError):
        pass
    found = None
    for line in lines:
        for m in _MODEL_URI.finditer(line):
            found = f"models:/{m.group(1)}/{m.group(2)}"
    return found
