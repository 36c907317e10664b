"""The launch contract: JobSpec (what to run), JobState/JobStatus (how it went), Backend.

Modelled on TorchX's Scheduler: the base class owns `submit()` (= dryrun + schedule) and
`wait()`; a backend implements small hooks and maps its native states through a table.
`dryrun()` is a feature: it returns exactly what would be submitted (argv, sbatch script,
manifests) so users can read it and tests can check it without a cluster.
"""
from __future__ import annotations

import enum
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

from ..config import GpuRequest


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    job_id: str  # "BACKEND:NATIVE_ID"
    state: JobState
    exit_code: int | None = None
    reason: str | None = None  # why it failed / was cancelled, or the tail of its log
    name: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "state": self.state.value, "exit_code": self.exit_code,
            "reason": self.reason, "name": self.name,
            "started_at": self.started_at, "finished_at": self.finished_at,
        }


def timestamp(value: Any) -> float | None:
    """A backend's time -> epoch seconds: ISO 8601 text (Docker's nanoseconds, a "Z", Slurm's
    local time without zone) or a datetime; None when unset ("", "Unknown", Docker's 0001-01-01)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if not value or str(value).startswith("0001-"):
        return None
    try:  # fromisoformat takes at most microseconds
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", str(value).replace("Z", "+00:00"))).timestamp()
    except ValueError:
        return None


# Where each volume is mounted inside a container (docker, kubernetes, slurm containers).
CONTAINER_MOUNTS = {"workspace": "/workspace", "data": "/data", "models": "/models", "logs": "/logs"}


@dataclass(frozen=True)
class JobSpec:
    """One stage, resolved: everything a backend needs and nothing backend-specific."""

    project: str
    stage: str
    command: tuple[str, ...]  # argv of the stage's `run` (split with shlex)
    image: str  # the project image tag (docker/kubernetes/slurm containers)
    workdir: Path  # host working directory (the workspace volume, or stage.workdir)
    volumes: dict[str, Path]  # workspace/data/models/logs -> absolute host path
    env: dict[str, str] = field(default_factory=dict)
    gpus: GpuRequest = field(default_factory=GpuRequest)
    nodes: int = 1
    cpus: int | None = None
    memory_bytes: int | None = None
    shm_bytes: int | None = None
    time_limit: timedelta | None = None
    distributed: str = "none"  # "none" | "ddp"
    retries: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # MLflow tracking of the job's metrics (CAPSULE_TRACKING_* of registry/tracking.py), host form:
    # capsule_env maps an embedded store's path to where the job sees it.
    tracking: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.project}-{self.stage}"

    @property
    def log_dir(self) -> Path:
        return self.volumes["logs"]


@dataclass(frozen=True)
class DryRun:
    """What a backend would submit: `text` is shown to users; `request` is what schedule() takes."""

    backend: str
    spec: JobSpec
    text: str
    request: Any


class Backend(ABC):
    name: str = ""
    # True when the job's machines pull the image from a registry (a cluster), so it must be
    # named by its pushed digest (image.push.pull_ref); False when it runs here.
    pulls_image: bool = False

    # -- owned by the base class ------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        """Submit a job; returns its id 'BACKEND:NATIVE'."""
        self.check_available()
        return self.schedule(self.dryrun(spec))

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> JobStatus:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            st = self.status(job_id)
            if st.state.terminal:
                return st
            if deadline is not None and time.monotonic() > deadline:
                return st
            time.sleep(poll_s)

    def job_id(self, native: str) -> str:
        return f"{self.name}:{native}"

    def native(self, job_id: str) -> str:
        """'slurm:42' -> '42' for this backend (launch.backend_of parses every job id)."""
        from . import backend_of
        from ..errors import JobNotFound

        name, native = backend_of(job_id)
        if name != self.name:
            raise JobNotFound(f"'{job_id}' is a {name} job, not a {self.name} one; see `capsule jobs list`")
        return native

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job: the ranks get SIGTERM (they save a checkpoint), SIGKILL after a grace period.
        A job that already ended keeps its real outcome. Returns the status it had before."""
        st = self.status(job_id)
        if st.state.terminal:
            self._cancel_ended(self.native(job_id))
        else:
            self._cancel_existing(self.native(job_id))
        return st

    def _cancel_ended(self, native: str) -> None:
        """Hook: clean up after a job that ended (nothing to do unless the backend knows better)."""

    # -- hooks each backend implements ------------------------------------------------------
    @abstractmethod
    def check_available(self) -> None:
        """Raise BackendError (one line, with the fix) when the backend cannot be used here."""

    @abstractmethod
    def dryrun(self, spec: JobSpec) -> DryRun:
        """What would be submitted, without side effects: `text` for people, `request` for
        schedule(). The stage's argv and env come from launch.command.stage_command. Raises
        BackendError when the backend cannot run the spec (e.g. several nodes on one machine)."""

    @abstractmethod
    def schedule(self, dryrun: DryRun) -> str:
        """Start `dryrun.request` (checks that need the machine or cluster happen here first);
        returns the job id 'BACKEND:NATIVE'."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's state now, mapped from the native one by the backend's pure `job_status`; a
        failed job's code and reason come from launch.failure.explain_failure. JobNotFound
        (one line) for an id the backend does not know."""

    @abstractmethod
    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        """The job's output, one line per item without its newline; `follow` until it ends."""

    @abstractmethod
    def _cancel_existing(self, native: str) -> None:
        """Stop a job that has not ended (cancel() checked); it then reads CANCELLED, not FAILED."""

    @abstractmethod
    def list(self) -> list[JobStatus]:
        """Every job of this backend started by torchcapsule (that it can still see)."""
