"""Training runs in MLflow: the metrics JSONL of a stage, pushed to the project's tracking store.

The JSONL that `torchcapsule.train.MetricsLogger` writes is the buffer and the source of truth;
this module moves its complete lines into one MLflow run per training and remembers how far it
got in a state file next to it (`metrics-<stage>.mlflow.json`: run id, byte offset, context).
So a store that is down loses nothing: the lines wait in the JSONL and the next sync (the
follower, the next training, `capsule run`, `capsule models register`, `capsule ui`) sends them.

Run boundaries come from the JSONL's events: "started" opens a new run, "resumed" continues the
current one at its step (a restart or a resume continues the same curve), "preempted" marks it
KILLED until it resumes, "finished" ends it. A file without events gets one run.

The follower (`python -m torchcapsule.registry.tracking follow ...`) is the process that rank 0
of a training starts: it syncs every 5 s and once more when its stdin closes, in its own process
at the lowest CPU priority, so the training step never waits on the store nor shares the GIL or a
busy core with MLflow. The training's close() does not wait for it: a tail the follower cannot send
(a store down, a container that ends) is sent by the launcher's catch_up_job after the job.

Sending twice is harmless, so a sync killed halfway is simply redone: the state is written right
after a run is opened (a re-sent "started" line finds its run by its start time), and MLflow's SQL
store drops a metric point it already has (same key, step, timestamp and value).
mlflow is imported only inside functions (with registry/mlflow.py, the modules that import it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment the launcher gives every stage (launch/torchrun.capsule_env) and MetricsLogger reads.
ENV_URI = "CAPSULE_TRACKING_URI"
ENV_ARTIFACTS = "CAPSULE_TRACKING_ARTIFACTS"
ENV_CONTEXT = "CAPSULE_TRACKING_CONTEXT"  # JSON: command, git commit, image, lock hash
ENV_OFF = "CAPSULE_TRACKING"  # "off" disables it for one job
BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call
RESERVED = ("step", "time", "event")


def state_path(jsonl: str | Path) -> Path:
    """logs/metrics-train.jsonl -> logs/metrics-train.mlflow.json"""
    p = Path(jsonl)
    return p.with_name(p.name.removesuffix(".jsonl") + ".mlflow.json")


def context_path(jsonl: str | Path) -> Path:
    """logs/metrics-train.jsonl -> logs/metrics-train.context.json: the training's lineage and
    params, written by MetricsLogger at start, read by whichever sync opens the run."""
    p = Path(jsonl)
    return p.with_name(p.name.removesuffix(".jsonl") + ".context.json")


def write_context(jsonl: str | Path, context: dict[str, Any]) -> None:
    path = context_path(jsonl)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(context, default=str, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _context(jsonl: Path, st: dict[str, Any]) -> dict[str, Any]:
    try:
        written = json.loads(context_path(jsonl).read_text())
    except (OSError, ValueError):
        written = {}
    return {**(written if isinstance(written, dict) else {}), **(st.get("context") or {})}


# -- pure: what a line of the JSONL means --------------------------------------------------------
def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record that are metrics (not step/time, not bools, not NaN/inf strings)."""
    out = {}
    for k, v in record.items():
        if k in RESERVED or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[str(k)] = float(v)
    return out


def split_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Complete lines of DATA as records, and the bytes they used (a partly written last line
    waits for the next sync). A line that is not a JSON object is skipped, not retried forever."""
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, end


@dataclass
class Action:
    kind: str  # "open" (new run) | "resume" | "pause" | "end" | "metrics"
    step: int
    time_ms: int
    metrics: dict[str, float]


def actions(records: list[dict[str, Any]]) -> list[Action]:
    """Records -> what to do in MLflow, in order (pure)."""
    out = []
    for rec in records:
        step = int(rec.get("step") or 0)
        t = int(float(rec.get("time") or time.time()) * 1000)
        values = metric_values(rec)
        event = rec.get("event")
        kind = {"started": "open", "resumed": "resume", "preempted": "pause", "finished": "end"}.get(event)
        if event == "finished" and values:  # its values (final test accuracy) are points too
            out.append(Action("metrics", step, t, values))
        elif event is None and values:
            out.append(Action("metrics", step, t, values))
        if kind:
            out.append(Action(kind, step, t, values if kind == "open" else {}))
    return out


# -- the state file ------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(jsonl: Path, *, wait: bool = True) -> Iterator[bool]:
    """One syncer of a JSONL at a time (the follower of a restarted rank, `capsule run` after it)."""
    lock = state_path(jsonl).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(jsonl: str | Path) -> dict[str, Any]:
    try:
        st = json.loads(state_path(jsonl).read_text())
    except (OSError, ValueError):
        return {}
    return st if isinstance(st, dict) else {}


def _write_state(jsonl: Path, st: dict[str, Any]) -> None:
    path = state_path(jsonl)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_id_of(jsonl: str | Path) -> str | None:
    """The MLflow run of the last training logged to JSONL (None before its first sync)."""
    return read_state(jsonl).get("run_id")


def pending_bytes(jsonl: str | Path) -> int:
    """Bytes of JSONL no sync has sent yet (no mlflow import: callers check before syncing)."""
    try:
        size = Path(jsonl).stat().st_size
    except OSError:
        return 0
    offset = int(read_state(jsonl).get("offset") or 0)
    return size - offset if size >= offset else size


def catch_up(logs_dir: str | Path, uri: str, *, artifact_location: str | None = None,
             stages: list[str] | None = None) -> list[str]:
    """Send what the trainings in LOGS_DIR could not send themselves (a store that was down, a
    container that could not reach it). Returns one note per JSONL still pending; never raises
    for an unreachable store: the lines wait for the next time."""
    from ..errors import CapsuleError

    notes = []
    files = sorted(Path(logs_dir).glob("metrics-*.jsonl")) if stages is None else \
        [Path(logs_dir) / f"metrics-{s}.jsonl" for s in stages]
    for jsonl in files:
        if pending_bytes(jsonl) <= 0:
            continue
        try:
            sync(jsonl, uri, artifact_location=artifact_location)
        except CapsuleError as e:
            notes.append(f"{jsonl}: metrics not sent to MLflow yet ({e}); they are sent on the next run, "
                         "`capsule models register` or `capsule ui`")
    return notes


def catch_up_job(spec) -> list[str]:
    """catch_up for the stage of a finished job (a launch JobSpec), with the store it was given:
    what `capsule run` and `capsule pipeline run` both do once a job ends."""
    uri = spec.tracking.get("CAPSULE_TRACKING_URI")
    if not uri:
        return []
    return catch_up(spec.log_dir, uri, stages=[spec.stage],
                    artifact_location=spec.tracking.get("CAPSULE_TRACKING_ARTIFACTS") or None)


# -- effects: MLflow -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncResult:
    run_id: str | None
    points: int  # metric values sent by this sync
    pending: int  # bytes of the JSONL not sent yet


def _experiment_name(st: dict[str, Any], jsonl: Path) -> str:
    return _context(jsonl, st).get("project") or os.environ.get("CAPSULE_PROJECT") or jsonl.parent.resolve().parent.name


def sync(jsonl: str | Path, uri: str, *, context: dict[str, Any] | None = None,
         artifact_location: str | None = None, wait: bool = True, store_lock: bool = True) -> SyncResult:
    """Send the lines of JSONL not sent yet to their run(s) in the store at URI.

    context: tags/params of the training (MetricsLogger's: command, world size, git commit,
    image, lock hash) kept in the state for runs opened later. Raises RegistryError when the
    store cannot be reached; the state then still says what is pending. store_lock=False: the
    caller already holds the SQLite store's writer lock (registration).
    """
    from ..errors import RegistryError

    jsonl = Path(jsonl)
    with _locked(jsonl, wait=wait) as got:
        if not got:
            return SyncResult(run_id_of(jsonl), 0, -1)
        st = read_state(jsonl)
        if context:
            st["context"] = {**(st.get("context") or {}), **context}
        if artifact_location:
            st["artifact_location"] = artifact_location
        st.setdefault("offset", 0)
        try:
            size = jsonl.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < st["offset"]:  # the JSONL was removed or truncated: a new file, a new run
            st.update(offset=0, run_id=None)
        with open(jsonl, "rb") if size else contextlib.nullcontext(None) as fh:
            data = b""
            if fh is not None:
                fh.seek(st["offset"])
                data = fh.read()
        records, used = split_lines(data)
        todo = actions(records)
        if not todo:
            st["offset"] += used
            _write_state(jsonl, st)
            return SyncResult(st.get("run_id"), 0, len(data) - used)
        from .mlflow import _client, _errors
        from .store import writer_lock

        lock = writer_lock(uri) if store_lock else contextlib.nullcontext()
        with lock, _errors(uri), contextlib.redirect_stdout(sys.stderr):
            client = _client(uri)
            points = _apply(client, st, todo, jsonl, save=lambda: _write_state(jsonl, st))
        st["offset"] += used
        st["tracking_uri"] = uri
        _write_state(jsonl, st)
        if st.get("run_id") is None:
            raise RegistryError(f"{jsonl}: no run was opened in {uri}")
        return SyncResult(st.get("run_id"), points, len(data) - used)


def _run_tags(ctx: dict[str, Any]) -> dict[str, str]:
    tags = {"capsule.kind": "training"}
    for key in ("project", "stage", "command", "world_size", "git_commit", "image_tag", "image_digest",
                "lock_hash", "backend", "job_id"):
        if ctx.get(key) not in (None, ""):
            tags[f"capsule.{key}"] = str(ctx[key])[:5000]
    if ctx.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(ctx["git_commit"]).removesuffix("-dirty")
    if ctx.get("command"):
        tags["mlflow.source.name"] = str(ctx["command"])[:500]
    return tags


def _open_run(client: Any, st: dict[str, Any], jsonl: Path, start_ms: int, step: int) -> str:
    from mlflow.entities import Param

    from .mlflow import _experiment

    exp_id = _experiment(client, _experiment_name(st, jsonl), st.get("artifact_location"))
    ctx = _context(jsonl, st)
    name = f"{ctx.get('stage') or jsonl.stem.removeprefix('metrics-')}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(start_ms / 1000))}"
    run = client.create_run(exp_id, start_time=start_ms, tags=_run_tags(ctx), run_name=name)
    st["experiment_id"] = exp_id
    params = {"world_size": ctx.get("world_size"), "command": ctx.get("command"), "start_step": step,
              **{str(k): v for k, v in (ctx.get("params") or {}).items()}}
    plist = [Param(k, str(v)[:6000]) for k, v in params.items() if v not in (None, "")]
    if plist:
        client.log_batch(run.info.run_id, params=plist)
    return run.info.run_id


def _apply(client: Any, st: dict[str, Any], todo: list[Action], jsonl: Path, save=lambda: None) -> int:
    from mlflow.entities import Metric, RunStatus

    points = 0
    pending: list[Any] = []

    def flush() -> None:
        nonlocal pending
        for i in range(0, len(pending), BATCH):
            client.log_batch(st["run_id"], metrics=pending[i:i + BATCH])
        pending = []

    for a in todo:
        if a.kind == "open" and st.get("run_id") and st.get("run_start_ms") == a.time_ms:
            continue  # this "started" line opened the run already (a sync killed before its state was saved)
        if a.kind == "open" or st.get("run_id") is None:
            flush()
            if st.get("run_id") and st.get("open"):  # a new training began before the last one ended
                client.set_terminated(st["run_id"], "KILLED", end_time=a.time_ms)
            st["run_id"], st["open"] = _open_run(client, st, jsonl, a.time_ms, a.step), True
            st["run_start_ms"] = a.time_ms
            save()  # a redone sync must find this run, not open a second one
            if a.kind == "open":
                continue
        if a.kind == "metrics":
            pending += [Metric(k, v, a.time_ms, a.step) for k, v in a.metrics.items()]
            points += len(a.metrics)
        elif a.kind == "resume":
            flush()
            client.update_run(st["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
            st["open"] = True
        elif a.kind in ("pause", "end"):
            flush()
            client.set_terminated(st["run_id"], "KILLED" if a.kind == "pause" else "FINISHED", end_time=a.time_ms)
            st["open"] = a.kind == "pause"
    flush()
    return points


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, in step order (pipeline status sparklines, tests)."""
    from .mlflow import _client, _errors

    with _errors(uri):
        hist = _client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def run_url(uri: str, run_id: str, experiment_id: str | None = None, *, ui: str | None = None) -> str:
    """The run's page in the MLflow UI (UI: its base URL; a remote tracking server is its own UI)."""
    base = (ui or (uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")).rstrip("/")
    exp = experiment_id if experiment_id is not None else "0"
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


# -- the follower process ------------------------------------------------------------------------
def follow(jsonl: Path, uri: str, *, context: dict[str, Any], artifact_location: str | None,
           interval: float = 5.0, final_timeout: float = 20.0) -> int:
    """Sync every INTERVAL seconds until stdin closes (the training ended or died), then flush.

    A failing store backs off (up to 30 s) and is retried; nothing here ever stops the training.
    Every sync costs a fixed part (the store's run lookups, the state file) on top of its points:
    a few large batches cost the training's cores less than many small ones.
    """
    import resource
    import select

    from ..errors import CapsuleError

    lowest_priority()  # again: a follower started by hand, or a platform without it
    delay, closed, deadline = interval, False, None
    system = None
    sent = 0
    while True:
        try:
            res = sync(jsonl, uri, context=context, artifact_location=artifact_location)
            context = {}
            sent += res.points
            delay = interval
            if system is None and res.run_id and os.environ.get("CAPSULE_SYSTEM_METRICS", "1") != "0":
                system = _system_metrics(res.run_id, uri)
            if closed and res.pending <= 0:
                break
        except CapsuleError as e:  # the store is down: back off; the deadline below ends the retries
            print(f"tracking: {e} (metrics stay in {jsonl} and are sent later)", file=sys.stderr, flush=True)
            delay = min(delay * 2, 30.0)
        if closed and time.monotonic() > deadline:
            break
        if not closed:
            ready, _, _ = select.select([sys.stdin], [], [], delay)
            if ready and not sys.stdin.buffer.read1(4096):
                closed, deadline = True, time.monotonic() + final_timeout
        else:
            time.sleep(min(delay, 1.0))
    if system is not None:
        with contextlib.suppress(Exception):
            system.finish()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"tracking: done, {sent} points sent, {ru.ru_utime + ru.ru_stime:.2f} s CPU, "
          f"{pending_bytes(jsonl)} bytes left for the next sync", file=sys.stderr, flush=True)
    return 0


def lowest_priority(pid: int = 0) -> None:
    """The training has the CPU first: the follower (PID, 0: this process) runs only on a core
    the training leaves idle (SCHED_IDLE on Linux, else nice 19)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, pid, 19)


def _system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's own sampler (CPU, memory, disk, network; GPUs through NVML when present)."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        mon = SystemMetricsMonitor(run_id, sampling_interval=float(os.environ.get("CAPSULE_SYSTEM_METRICS_INTERVAL", "10")),
                                   samples_before_logging=1)
        mon.start()
        return mon
    except Exception as e:  # noqa: BLE001 - psutil missing or an old MLflow: no system metrics
        print(f"tracking: no system metrics ({e})", file=sys.stderr, flush=True)
        return False


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m torchcapsule.registry.tracking")
    p.add_argument("command", choices=["follow", "sync"])
    p.add_argument("jsonl", type=Path)
    p.add_argument("--uri", required=True)
    p.add_argument("--context", default="{}")
    p.add_argument("--artifacts", default=None)
    p.add_argument("--interval", type=float, default=float(os.environ.get("CAPSULE_TRACKING_INTERVAL", "5")))
    args = p.parse_args(argv)
    ctx = json.loads(args.context)
    if args.command == "sync":
        res = sync(args.jsonl, args.uri, context=ctx, artifact_location=args.artifacts)
        print(json.dumps({"run_id": res.run_id, "points": res.points, "pending": res.pending}))
        return 0
    return follow(args.jsonl, args.uri, context=ctx, artifact_location=args.artifacts, interval=args.interval)


if __name__ == "__main__":
    sys.exit(main())
