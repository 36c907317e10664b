"""A training's curve for the terminal (pure apart from reading its metrics JSONL and tracking
state): the sparkline `capsule pipeline status` and the run summary show next to the final
metric, and the MLflow run it is in."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .scrape import written_since

BARS = "▁▂▃▄▅▆▇█"
# The metric a curve shows, in order of preference (the first a training logged).
CURVE_METRICS = ("loss", "train_loss", "val_loss", "accuracy", "test_accuracy", "val_accuracy")


def sparkline(values: list[float], width: int = 24) -> str:
    """Values -> at most WIDTH bars (bucket means when there are more values than bars)."""
    vals = [float(v) for v in values]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [sum(vals[i * n // width:(i + 1) * n // width]) / max(1, (i + 1) * n // width - i * n // width)
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return BARS[len(BARS) // 2] * len(vals)
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / (hi - lo) * len(BARS)))] for v in vals)


@dataclass(frozen=True)
class Curve:
    metric: str
    values: tuple[float, ...]
    run_id: str | None = None
    url: str | None = None
    served: bool = False  # the store is a tracking server (its own UI); else `capsule ui` serves it

    @property
    def final(self) -> float:
        return self.values[-1]

    def text(self, width: int = 24) -> str:
        return f"{self.metric} {sparkline(list(self.values), width)} {self.final:.4g}"

    def link(self) -> str | None:
        """Where to see the run: its URL, behind `capsule ui` for the embedded store."""
        if self.url is None:
            return None
        return self.url if self.served else f"`capsule ui`, then {self.url}"


def curve_of(records: list[dict], metric: str | None = None) -> tuple[str, list[float]] | None:
    """(metric, values in step order) of the last training in RECORDS (after its last "started")."""
    start = max((i for i, r in enumerate(records) if r.get("event") == "started"), default=-1)
    points = [r for r in records[start + 1:] if "event" not in r]
    names = [metric] if metric else list(CURVE_METRICS)
    for name in names:
        vals = [r[name] for r in points if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
        if vals:
            return name, [float(v) for v in vals]
    return None


def training_curve(logs: Path, stage: str, *, since: float | None = None, until: float | None = None,
                   ui_url: str | None = None) -> Curve | None:
    """The curve of logs/metrics-STAGE.jsonl and its MLflow run URL (once a sync made the run).
    since/until: the attempt's times; a file last written outside them is another training's."""
    from ..registry.tracking import read_state, run_url

    path = Path(logs) / f"metrics-{stage}.jsonl"
    if not written_since(path, since) or (until is not None and written_since(path, until + 1)):
        return None
    try:
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return None
    found = curve_of([r for r in records if isinstance(r, dict)])
    if found is None:
        return None
    st = read_state(path)
    run_id, uri = st.get("run_id"), st.get("tracking_uri") or ""
    url = run_url(uri, run_id, st.get("experiment_id"), ui=ui_url) if run_id else None
    return Curve(found[0], tuple(found[1]), run_id, url, served=uri.startswith(("http://", "https://")))
