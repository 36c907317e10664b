"""Runs the pipeline: pre-flight doctor, then each selected stage in DAG order through a launch
backend, with a run record rewritten at every step, cache skips, log streaming, live progress,
and Ctrl-C/SIGTERM handling that cancels the running job and records the run as interrupted.

The decisions (order, selection, skip or run) come from the pure modules dag and cache; this
module only carries them out.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Project
from ..errors import CapsuleError, ImageError, PipelineError, PipelineInterrupted
from . import cache, dag


def escape(text: str) -> str:
    """Show text as written: a log line's "[capsule]" is not rich markup."""
    from rich.markup import escape as _escape

    return _escape(text)
from .record import RunRecord, RunStore, StageRecord, new_run_id

# Metric names shown in the progress view, best first; otherwise the first number found.
_METRIC_PREFERENCE = ("accuracy", "val_accuracy", "acc", "f1", "auc", "val_loss", "loss")
_MODEL_URI = re.compile(r"models:/([A-Za-z0-9_.-]+)/(\d+)")
_LOCAL_MACHINE_BACKENDS = ("local", "docker")  # stages use this machine's GPUs


@dataclass
class RunOptions:
    on: str = "local"
    from_stage: str | None = None
    only: tuple[str, ...] = ()
    force: bool = False
    doctor: bool = True
    backend_options: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 0.5


# -- small effects ---------------------------------------------------------------------------
def _fresh(p: Path, since: float | None) -> bool:
    """Written by this attempt (a file left by an earlier run says nothing about this one)."""
    try:
        return since is None or p.stat().st_mtime >= since - 0.1  # file times are a few ms coarse
    except OSError:
        return False


def key_metric(logs: Path, stage: str, since: float | None = None) -> dict[str, float] | None:
    """{name: value} from logs/metrics-<stage>.json, or the last line of a metrics .jsonl."""
    data: Any = None
    candidates = [logs / f"metrics-{stage}.json"]
    for p in candidates:
        if not _fresh(p, since):
            continue
        try:
            data = json.loads(p.read_text())
            break
        except (OSError, ValueError):
            continue
    if data is None:
        for p in (logs / f"metrics-{stage}.jsonl", logs / stage / "metrics.jsonl", logs / f"{stage}.jsonl"):
            if not _fresh(p, since):
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


def _fmt_s(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _fmt_metric(m: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items()) if m else ""


# -- progress view ---------------------------------------------------------------------------
_STYLE = {"succeeded": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow",
          "running": "bold blue", "pending": "dim"}


class Progress:
    """A live table on a terminal; one line per event (and the stage logs) elsewhere (CI, pipes)."""

    def __init__(self, console, record: RunRecord, *, stream_logs: bool) -> None:
        self.console = console
        self.record = record
        self.live = None
        self.tail: dict[str, str] = {}
        self.stream_logs = stream_logs
        self._lock = threading.Lock()

    def table(self):
        from rich.table import Table

        t = Table(title=f"pipeline {self.record.run_id} on {self.record.backend}", title_justify="left")
        for col in ("stage", "state", "duration", "metric", "detail"):
            t.add_column(col, overflow="fold")
        now = time.time()
        for s in self.record.stages:
            dur = s.duration_s if s.duration_s is not None else (now - s.started_at if s.started_at else None)
            detail = self.tail.get(s.name, "") if s.state == "running" else (s.reason or "")
            t.add_row(s.name, f"[{_STYLE.get(s.state, '')}]{s.state}[/]", _fmt_s(dur),
                      _fmt_metric(s.metric), escape(detail[-80:]))
        return t

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(get_renderable=self.table, console=self.console, refresh_per_second=4,
                             transient=True)  # the summary table replaces it at the end
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def event(self, stage: StageRecord) -> None:
        if self.live is not None:
            return  # the table shows it
        with self._lock:
            bits = [f"{stage.name}: {stage.state}"]
            if stage.duration_s is not None:
                bits.append(f"in {_fmt_s(stage.duration_s)}")
            if stage.metric:
                bits.append(_fmt_metric(stage.metric))
            if stage.reason:
                bits.append(f"({stage.reason})")
            self.console.print(f"[{_STYLE.get(stage.state, '')}]" + escape(" ".join(bits)) + "[/]")

    def log(self, stage: str, line: str) -> None:
        self.tail[stage] = line
        if self.live is None and self.stream_logs:
            with self._lock:
                self.console.print(f"[dim]{stage} |[/] {escape(line)}", markup=True, highlight=False)


# -- the runner ------------------------------------------------------------------------------
class Runner:
    def __init__(self, project: Project, options: RunOptions, *, console=None, stream_logs: bool = True) -> None:
        from rich.console import Console

        self.project = project
        self.opts = options
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.stream_logs = stream_logs
        self.logs = project.volume_path("logs")
        self.store = RunStore(self.logs)
        self.graph = dag.graph_of(project)
        self._fps: dict[str, str] = {}

    # fingerprints ---------------------------------------------------------------------------
    def _inputs(self, name: str) -> dict[str, str]:
        return cache.hash_inputs(self.project.root, self.project.stages[name].inputs)

    def fingerprint(self, name: str, inputs: dict[str, str] | None = None) -> str:
        """The stage's fingerprint now (upstream ones as recorded by this run, or computed)."""
        upstream = {}
        for need in self.graph[name]:
            if need not in self._fps:
                self._fps[need] = self.fingerprint(need)
            upstream[need] = self._fps[need]
        stage_cfg = self.project.stages[name].model_dump(mode="json")
        return cache.fingerprint(stage_cfg, inputs if inputs is not None else self._inputs(name),
                                 self.image, upstream)

    # pre-flight -----------------------------------------------------------------------------
    def preflight(self, stages: list[str]) -> dict[str, Any]:
        if not self.opts.doctor:
            return {"skipped": "--no-doctor"}
        if importlib.util.find_spec("torchcapsule.cli.doctor") is None:
            return {"skipped": "capsule doctor is not part of this installation"}
        argv = ["capsule", "doctor"]
        if self.opts.on in _LOCAL_MACHINE_BACKENDS and any(
                self.project.stages[s].resources.gpus.count for s in stages):
            argv.append("--require-gpus")
        r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", *argv[1:]], cwd=self.project.root,
                           capture_output=True, text=True, timeout=300)
        out = (r.stdout + r.stderr).strip().splitlines()
        return {"command": argv, "exit_code": r.returncode, "output": out[-20:]}

    # the run --------------------------------------------------------------------------------
    def run(self) -> RunRecord:
        from ..image.tags import project_tag
        from ..launch import get_backend

        o = self.opts
        if not self.graph:
            raise PipelineError(f"{self.project.root / 'capsule.yaml'}: stages: none defined; add stages such as "
                                "`stages: {train: {run: train.py}}` (see `capsule init`)")
        selected = dag.select(self.graph, from_stage=o.from_stage, only=o.only)
        history = self.store.all()
        prev = history[0] if history else None
        if prev is not None and prev.state == "running" and prev.host == socket.gethostname():
            # (a record from another host sharing the logs volume cannot be checked: not blocked)
            raise PipelineError(
                f"pipeline run {prev.run_id} is still running (pid {prev.pid} on {prev.host}); "
                f"wait for it, or see `capsule pipeline status {prev.run_id}`")
        self.image = project_tag(self.project)
        rec = RunRecord(
            run_id=new_run_id(), project=self.project.name, backend=o.on, image=self.image,
            options={"from": o.from_stage, "only": list(o.only), "force": o.force},
            stages=[StageRecord(name=n) for n in selected],
        )
        if prev is not None and prev.state in ("failed", "interrupted"):
            rec.resumed_from = prev.run_id
            self.console.print(f"resuming run {prev.run_id} ({prev.state} at stage {prev.failed_stage}); "
                               "stages that succeeded with unchanged inputs are skipped")
        self.store.save(rec)
        run_dir = self.store.dir / rec.run_id
        try:
            rec.preflight = self.preflight(selected)
            if rec.preflight.get("exit_code"):
                last = next((ln for ln in reversed(rec.preflight["output"]) if ln.strip()), "")
                raise PipelineError(f"pre-flight `capsule doctor` failed (exit {rec.preflight['exit_code']}): "
                                    f"{last.strip()}; fix that, or pass --no-doctor to skip the check")
            backend = get_backend(o.on, project=self.project, **o.backend_options)
            with Progress(self.console, rec, stream_logs=self.stream_logs) as progress:
                for name in selected:
                    if not self._stage(rec, name, backend, progress, run_dir, history):
                        break
        except KeyboardInterrupt:
            rec.state = "interrupted"
            rec.error = "interrupted (Ctrl-C or SIGTERM)"
            for s in rec.stages:
                if s.state == "running":
                    s.state, s.reason = "interrupted", "interrupted"
            raise PipelineInterrupted(
                f"pipeline run {rec.run_id} interrupted; `capsule pipeline run` resumes it") from None
        except CapsuleError as e:
            rec.state, rec.error = "failed", str(e)
            raise
        except BaseException as e:  # a bug: still leave a truthful record behind
            rec.state, rec.error = "failed", f"{type(e).__name__}: {e}"
            raise
        else:
            failed = rec.failed_stage
            rec.state = "failed" if failed else "succeeded"
            if failed:
                rec.error = f"stage {failed} failed: {rec.stage(failed).reason}"
        finally:
            rec.finished_at = time.time()
            rec.duration_s = round(rec.finished_at - rec.started_at, 3)
            self.store.save(rec)
        return rec

    def _stage(self, rec: RunRecord, name: str, backend, progress: Progress, run_dir: Path,
               history: list[RunRecord]) -> bool:
        """Decide and carry out one stage; False stops the run."""
        from ..launch.spec import job_spec, pulled_image

        st = rec.stage(name)
        stage = self.project.stages[name]
        inputs = self._inputs(name)
        fp = self.fingerprint(name, inputs)
        decision = cache.decide(fp, self.store.last_attempt(name, history), force=self.opts.force,
                                missing_outputs=cache.missing_outputs(self.project.root, stage.outputs),
                                inputs=inputs)
        st.fingerprint, st.inputs, st.reason = fp, inputs, decision.reason
        if not decision.run:
            st.state, st.cached_from = "skipped", decision.cached_from
            st.metric = self._cached_metric(name, decision.cached_from, history)
            self._fps[name] = fp
            self.store.save(rec)
            progress.event(st)
            return True

        image, refusal = pulled_image(self.project, backend)  # a cluster pulls it by its digest
        spec = job_spec(self.project, name, image=image)
        outputs_file = run_dir / f"{name}.outputs.json"
        spec = dataclasses.replace(spec, env={
            **spec.env, "CAPSULE_PIPELINE_RUN_ID": rec.run_id, "CAPSULE_PIPELINE_STAGE": name,
            "CAPSULE_PIPELINE_OUTPUTS": str(outputs_file)})
        st.command = list(spec.command)
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / f"{name}.log"
        st.log = str(log_path)
        st.state, st.started_at = "running", time.time()
        self.store.save(rec)
        progress.event(st)
        try:
            if refusal:
                raise ImageError(refusal)
            st.job_id = backend.submit(spec)
        except CapsuleError as e:
            st.state, st.reason, st.exit_code = "failed", str(e), None
            self._finish(st)
            self.store.save(rec)
            progress.event(st)
            return False
        self.store.save(rec)
        lines: collections.deque[str] = collections.deque(maxlen=2000)
        follower = threading.Thread(target=self._follow, args=(backend, st.job_id, name, log_path, lines, progress),
                                    daemon=True)
        follower.start()
        try:
            status = backend.wait(st.job_id, poll_s=self.opts.poll_s)
        except KeyboardInterrupt:
            self._cancel(backend, st)
            self._finish(st)
            raise
        follower.join(timeout=10)
        st.exit_code = status.exit_code
        self._finish(st)
        st.metric = key_metric(self.logs, name, since=st.started_at)
        mv = model_version_from(list(lines), outputs_file)
        if mv:
            rec.model_version = mv
        if status.state.value == "SUCCEEDED":
            st.state = "succeeded"
            # record the inputs as the stage left them (a stage may rewrite its own inputs,
            # e.g. evaluate adding metrics to meta.json); an untouched rerun then matches
            st.inputs = self._inputs(name)
            st.fingerprint = self.fingerprint(name, st.inputs)
            self._fps[name] = st.fingerprint
            st.reason = decision.reason
        else:
            st.state = "interrupted" if status.state.value == "CANCELLED" else "failed"
            # the stage's own last words say more than the backend's summary line
            own = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("[capsule]")]
            why = own[-1][-200:] if own else (status.reason or status.state.value.lower())
            st.reason = f"exit {status.exit_code}: {why}" if status.exit_code is not None else why
        self.store.save(rec)
        progress.event(st)
        return st.state == "succeeded"

    def _follow(self, backend, job_id: str, name: str, log_path: Path, lines, progress: Progress) -> None:
        try:
            with log_path.open("a") as fh:
                for line in backend.logs(job_id, follow=True):
                    line = line.rstrip("\n")
                    fh.write(line + "\n")
                    fh.flush()
                    lines.append(line)
                    progress.log(name, line)
        except Exception as e:  # logs are best effort; the job's state decides the outcome
            lines.append(f"(log stream ended: {e})")

    def _cancel(self, backend, st: StageRecord) -> None:
        st.state, st.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM): job cancelled"
        try:
            backend.cancel(st.job_id)
            final = backend.wait(st.job_id, poll_s=0.2, timeout_s=15)
            st.exit_code = final.exit_code
        except (CapsuleError, KeyboardInterrupt):
            pass

    @staticmethod
    def _finish(st: StageRecord) -> None:
        st.finished_at = time.time()
        if st.started_at:
            st.duration_s = round(st.finished_at - st.started_at, 3)

    @staticmethod
    def _cached_metric(name: str, run_id: str | None, history: list[RunRecord]) -> dict | None:
        for r in history:
            if r.run_id == run_id:
                for s in r.stages:
                    if s.name == name:
                        return s.metric
        return None


def summary(console, rec: RunRecord) -> None:
    from rich.table import Table

    t = Table(title=f"run {rec.run_id}: {rec.state} in {_fmt_s(rec.duration_s)}", title_justify="left")
    for col in ("stage", "state", "duration", "metric", "exit", "reason"):
        t.add_column(col, overflow="fold")
    for s in rec.stages:
        t.add_row(s.name, f"[{_STYLE.get(s.state, '')}]{s.state}[/]", _fmt_s(s.duration_s),
                  _fmt_metric(s.metric), "" if s.exit_code is None else str(s.exit_code), escape(s.reason or ""))
    console.print(t)
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


__all__ = ["Runner", "RunOptions", "PipelineInterrupted", "summary", "key_metric", "model_version_from"]
