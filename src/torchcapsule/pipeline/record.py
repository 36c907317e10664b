"""Run records: one JSON file per pipeline run under <logs volume>/runs/<run-id>.json.

A record is rewritten atomically (temp file + rename) at every state change, so a run killed at
any moment leaves a readable record. A record still saying `running` whose process is gone is
read as `interrupted`, and the next run resumes from it.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..launch._proc import pid_alive
from .cache import LastAttempt

RUN_STATES = ("running", "succeeded", "failed", "interrupted")
STAGE_STATES = ("pending", "running", "succeeded", "failed", "interrupted", "skipped")
ATTEMPTED = ("succeeded", "failed", "interrupted", "skipped")  # a decision was made and carried out


@dataclass
class StageRecord:
    name: str
    state: str = "pending"
    reason: str | None = None  # why it ran / was skipped / failed
    command: list[str] = field(default_factory=list)
    job_id: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    fingerprint: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # file -> sha256
    cached_from: str | None = None
    metric: dict[str, float] | None = None
    log: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunRecord:
    run_id: str
    project: str
    backend: str
    state: str = "running"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    duration_s: float | None = None
    image: str | None = None
    model_version: str | None = None
    resumed_from: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # from / only / force
    preflight: dict[str, Any] | None = None  # the doctor check: command, exit_code, output tail
    stages: list[StageRecord] = field(default_factory=list)
    error: str | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def stage(self, name: str) -> StageRecord:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in d.items() if k in names and k != "stages"})
        rec.stages = [StageRecord.from_dict(s) for s in d.get("stages", [])]
        return rec

    @property
    def failed_stage(self) -> str | None:
        for s in self.stages:
            if s.state in ("failed", "interrupted"):
                return s.name
        return None


def new_run_id(now: float | None = None) -> str:
    """Sortable by time: 20261127-143700-1a2b3c."""
    t = time.gmtime(now if now is not None else time.time())
    return time.strftime("%Y%m%d-%H%M%S", t) + "-" + uuid.uuid4().hex[:6]


class RunStore:
    def __init__(self, logs_dir: Path) -> None:
        self.dir = Path(logs_dir) / "runs"

    def path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.json"

    def save(self, rec: RunRecord) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        dest = self.path(rec.run_id)
        tmp = dest.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(rec.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, dest)
        return dest

    def _read(self, p: Path) -> RunRecord | None:
        try:
            rec = RunRecord.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # a foreign or damaged file is not a run record; never fatal
        # A run whose process died without writing its end (SIGKILL, power loss) was interrupted.
        if rec.state == "running" and rec.host == socket.gethostname() and not pid_alive(rec.pid):
            rec.state = "interrupted"
            for s in rec.stages:
                if s.state == "running":
                    s.state = "interrupted"
        return rec

    def all(self) -> list[RunRecord]:
        """Every record, newest first."""
        if not self.dir.is_dir():
            return []
        recs = [r for p in sorted(self.dir.glob("*.json"), reverse=True) if (r := self._read(p))]
        return sorted(recs, key=lambda r: (r.started_at, r.run_id), reverse=True)

    def latest(self) -> RunRecord | None:
        recs = self.all()
        return recs[0] if recs else None

    def load(self, run_id: str | None = None) -> RunRecord:
        """A run by id or unique id prefix; the latest run when None."""
        if run_id in (None, "latest"):
            rec = self.latest()
            if rec is None:
                raise PipelineError(f"no pipeline runs recorded under {self.dir}; start one with `capsule pipeline run`")
            return rec
        exact = self.path(run_id)
        if exact.is_file() and (rec := self._read(exact)):
            return rec
        matches = [r for r in self.all() if r.run_id.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise PipelineError(f"no run '{run_id}' under {self.dir}; list runs with `capsule pipeline status --all`")
        raise PipelineError(f"run id '{run_id}' is ambiguous ({', '.join(r.run_id for r in matches[:5])}); give more of it")

    def last_attempt(self, stage: str, records: list[RunRecord] | None = None) -> LastAttempt | None:
        """The newest record in which `stage` was run or skipped (pending stages do not count)."""
        for rec in records if records is not None else self.all():
            for s in rec.stages:
                if s.name == stage and s.state in ATTEMPTED:
                    return LastAttempt(rec.run_id, s.state, s.fingerprint, s.inputs)
        return None


__all__ = ["RunRecord", "StageRecord", "RunStore", "new_run_id", "RUN_STATES", "STAGE_STATES"]
