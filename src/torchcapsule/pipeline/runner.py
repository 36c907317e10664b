"""The pipeline engine: pre-flight doctor, then each selected stage in DAG order through a launch
backend, with a run record rewritten at every step, cache skips, log capture, and Ctrl-C/SIGTERM
handling that cancels the running job and records the run as interrupted.

The decisions (order, selection, skip or run) come from the pure modules dag and cache; this
module only carries them out, and reports what happens through `Events` (view.py draws them).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from .record import ATTEMPTED, RunRecord, RunStore, StageRecord, new_run_id
from .scrape import key_metric, model_version_from

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


class Events:
    """What the engine reports while it runs (from its thread and the log followers'); these
    defaults say nothing. view.Progress draws them."""

    def watch(self, rec: RunRecord) -> contextlib.AbstractContextManager:
        """Held while the stages run."""
        return contextlib.nullcontext()

    def note(self, text: str) -> None:
        """A line for the user (resuming a run, metrics not sent to MLflow yet)."""

    def stage(self, st: StageRecord) -> None:
        """A stage changed state."""

    def log(self, stage: str, line: str) -> None:
        """A stage printed a line."""


class PipelineRunner:
    def __init__(self, project: Project, options: RunOptions, *, events: Events | None = None) -> None:
        self.project = project
        self.opts = options
        self.events = events or Events()
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
            self.events.note(f"resuming run {prev.run_id} ({prev.state} at stage {prev.failed_stage}); "
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
            with self.events.watch(rec):
                for name in selected:
                    if not self._stage(rec, name, backend, run_dir, history):
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

    def _stage(self, rec: RunRecord, name: str, backend, run_dir: Path, history: list[RunRecord]) -> bool:
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
            self.events.stage(st)
            return True

        adopted = self._leftover_job(name, fp, history, backend)
        if adopted is not None:  # its job id, log and outputs file are the interrupted run's
            run_dir = self.store.dir / adopted[1]
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
        self.events.stage(st)
        try:
            if adopted is not None:
                st.job_id = adopted[0]
            elif refusal:
                raise ImageError(refusal)
            else:
                st.job_id = backend.submit(spec)
        except CapsuleError as e:
            st.state, st.reason, st.exit_code = "failed", str(e), None
            self._finish(st)
            self.store.save(rec)
            self.events.stage(st)
            return False
        self.store.save(rec)
        lines: collections.deque[str] = collections.deque(maxlen=2000)
        follower = threading.Thread(target=self._follow, args=(backend, st.job_id, name, log_path, lines),
                                    daemon=True)
        follower.start()
        try:
            status = backend.wait(st.job_id, poll_s=self.opts.poll_s)
        except KeyboardInterrupt:
            self._cancel(backend, st)
            self._finish(st)
            raise
        follower.join(timeout=10)
        from ..registry.tracking import catch_up_job

        for note in catch_up_job(spec):  # metrics the job could not send to MLflow itself
            self.events.note(note)
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
        self.events.stage(st)
        return st.state == "succeeded"

    def _leftover_job(self, name: str, fp: str, history: list[RunRecord], backend) -> tuple[str, str] | None:
        """A run killed outright (kill -9, a lost node) leaves its stage's job running. Never start a
        second one beside it: adopt it when it runs what this run would ((job id, its run id)), else
        (inputs changed, --force) cancel it and wait until it has ended, then submit anew."""
        from ..launch import backend_of, get_backend

        run_id, last = next(((r.run_id, s) for r in history for s in r.stages
                             if s.name == name and s.state in ATTEMPTED), (None, None))
        if last is None or last.state != "interrupted" or not last.job_id:
            return None
        try:
            owner = backend if backend_of(last.job_id)[0] == self.opts.on else \
                get_backend(backend_of(last.job_id)[0], project=self.project)
            if owner.status(last.job_id).state.terminal:
                return None
            if last.fingerprint == fp and not self.opts.force:
                self.events.note(f"{name}: adopting job {last.job_id} of interrupted run {run_id}: still running")
                return last.job_id, run_id
            self.events.note(f"{name}: cancelling job {last.job_id} of interrupted run {run_id} "
                             f"({'--force' if self.opts.force else 'its inputs changed'})")
            owner.cancel(last.job_id)
            owner.wait(last.job_id, poll_s=0.2, timeout_s=120)
        except CapsuleError as e:  # gone or unreachable: nothing left to adopt
            self.events.note(f"{name}: job {last.job_id} of interrupted run {run_id}: {e}")
        return None

    def _follow(self, backend, job_id: str, name: str, log_path: Path, lines) -> None:
        try:
            with log_path.open("a") as fh:
                for line in backend.logs(job_id, follow=True):
                    line = line.rstrip("\n")
                    fh.write(line + "\n")
                    fh.flush()
                    lines.append(line)
                    self.events.log(name, line)
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


__all__ = ["PipelineRunner", "RunOptions", "Events", "PipelineInterrupted"]
