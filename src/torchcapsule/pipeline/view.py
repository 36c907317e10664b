"""The pipeline on a terminal (rich): the live progress table the engine reports to, and the
summary of a run record that `capsule pipeline run` ends with and `capsule pipeline status` shows.
The engine (runner.py) knows none of this: it calls the `Events` hooks that `Progress` draws."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from .curves import Curve, training_curve
from .record import RunRecord, StageRecord
from .runner import Events

_STYLE = {"succeeded": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow",
          "running": "bold blue", "pending": "dim"}


def escape(text: str) -> str:
    """Show text as written: a log line's "[capsule]" is not rich markup."""
    from rich.markup import escape as _escape

    return _escape(text)


def fmt_s(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def fmt_metric(m: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items()) if m else ""


def _state(s: StageRecord) -> str:
    return f"[{_STYLE.get(s.state, '')}]{s.state}[/]"


class Progress(Events):
    """A live table on a terminal; one line per event (and the stage logs) elsewhere (CI, pipes)."""

    def __init__(self, console, *, stream_logs: bool) -> None:
        self.console = console
        self.record: RunRecord | None = None
        self.live = None
        self.tail: dict[str, str] = {}
        self.stream_logs = stream_logs
        self._lock = threading.Lock()

    def table(self):
        from rich.table import Table

        rec = self.record
        t = Table(title=f"pipeline {rec.run_id} on {rec.backend}", title_justify="left")
        for col in ("stage", "state", "duration", "metric", "detail"):
            t.add_column(col, overflow="fold")
        now = time.time()
        for s in rec.stages:
            dur = s.duration_s if s.duration_s is not None else (now - s.started_at if s.started_at else None)
            detail = self.tail.get(s.name, "") if s.state == "running" else (s.reason or "")
            t.add_row(s.name, _state(s), fmt_s(dur), fmt_metric(s.metric), escape(detail[-80:]))
        return t

    @contextlib.contextmanager
    def watch(self, rec: RunRecord):
        self.record = rec
        if not self.console.is_terminal:
            yield
            return
        from rich.live import Live

        # transient: the summary table replaces it at the end
        with Live(get_renderable=self.table, console=self.console, refresh_per_second=4, transient=True) as live:
            self.live = live
            try:
                yield
            finally:
                self.live = None

    def note(self, text: str) -> None:
        with self._lock:
            self.console.print(escape(text))

    def stage(self, st: StageRecord) -> None:
        if self.live is not None:
            return  # the table shows it
        with self._lock:
            bits = [f"{st.name}: {st.state}"]
            if st.duration_s is not None:
                bits.append(f"in {fmt_s(st.duration_s)}")
            if st.metric:
                bits.append(fmt_metric(st.metric))
            if st.reason:
                bits.append(f"({st.reason})")
            self.console.print(f"[{_STYLE.get(st.state, '')}]" + escape(" ".join(bits)) + "[/]")

    def log(self, stage: str, line: str) -> None:
        self.tail[stage] = line
        if self.live is None and self.stream_logs:
            with self._lock:
                self.console.print(f"[dim]{stage} |[/] {escape(line)}", markup=True, highlight=False)


def curves_of(rec: RunRecord, logs: Path) -> dict[str, Curve]:
    """Each training stage's curve, from the metrics JSONL its attempt wrote (a skipped stage:
    the latest one, which the cache says is still current)."""
    found = {}
    for s in rec.stages:
        if s.state != "pending" and (c := training_curve(logs, s.name, since=s.started_at, until=s.finished_at)):
            found[s.name] = c
    return found


def summary(console, rec: RunRecord, logs: Path | None = None) -> None:
    """The record as a table; with LOGS (the logs volume), each training's curve and MLflow run
    on lines of their own (a table column would fold the sparkline and the URL)."""
    from rich.table import Table

    t = Table(title=f"run {rec.run_id}: {rec.state} in {fmt_s(rec.duration_s)}", title_justify="left")
    for col in ("stage", "state", "duration", "metric", "exit", "reason"):
        t.add_column(col, overflow="fold")
    for s in rec.stages:
        t.add_row(s.name, _state(s), fmt_s(s.duration_s), fmt_metric(s.metric),
                  "" if s.exit_code is None else str(s.exit_code), escape(s.reason or ""))
    console.print(t)
    for name, c in (curves_of(rec, logs) if logs is not None else {}).items():
        console.print(escape(f"{name}: {c.text()}"))
        if c.link():
            console.print(escape(f"  MLflow run: {c.link()}"))
    bits = [f"image {rec.image}"]
    if rec.model_version:
        bits.append(f"model {rec.model_version}")
    bits.append(f"record {rec.run_id}")
    console.print("  ".join(bits))
    failed = rec.failed_stage
    if failed:
        st = rec.stage(failed)
        if st.log:
            console.print(f"log of {failed}: {st.log}")
        console.print(f"next: fix {failed}, then `capsule pipeline run` resumes from it")
