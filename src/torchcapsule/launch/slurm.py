"""Slurm backend: an sbatch script that runs `srun torchrun` once per node.

dryrun() renders the script (pure); schedule() pipes it to `sbatch --parsable`. State comes
from `scontrol show job -o` (Slurm keeps finished jobs for MinJobAge), then from sacct when
accounting exists. Requeue on preemption: the job is submitted with --requeue; Slurm sends
SIGTERM to the steps and waits KillWait before SIGKILL, which is when the checkpointer saves;
the requeued script resumes from that checkpoint.
"""
from __future__ import annotations

import math
import re
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from ..config import ENV_KEY_RE, GpuRequest, Project, SlurmTarget, duration_text
from ..errors import BackendError, JobNotFound
from . import _proc
from .api import CONTAINER_MOUNTS, Backend, DryRun, JobSpec, JobState, JobStatus, timestamp
from .command import shell_join, stage_command
from .failure import ended_state, explain_failure

COMMENT = "torchcapsule"

SLURM_STATES: dict[str, JobState] = {
    "BOOT_FAIL": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "COMPLETED": JobState.SUCCEEDED,
    "COMPLETING": JobState.RUNNING,  # steps are ending; the exit code is not final yet
    "CONFIGURING": JobState.PENDING,
    "DEADLINE": JobState.FAILED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PENDING": JobState.PENDING,
    "PREEMPTED": JobState.FAILED,  # a --requeue job shows REQUEUED/PENDING instead
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "RESV_DEL_HOLD": JobState.PENDING,  # held because its reservation was deleted
    "REVOKED": JobState.CANCELLED,
    "RUNNING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "SPECIAL_EXIT": JobState.FAILED,
    "STAGE_OUT": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SUSPENDED": JobState.PENDING,
    "TIMEOUT": JobState.FAILED,
}

def signal_lead(time_limit: timedelta | None) -> int | None:
    """Seconds before the time limit at which the batch shell is told to requeue (checkpoint
    first): a tenth of the limit, at most 120 s. Slurm may signal up to 60 s early, so a limit
    under 10 minutes gets no requeue (it could fire at once, every time: a requeue loop); Slurm's
    SIGTERM at the limit still makes the ranks checkpoint (CANCELLED 75), and a rerun resumes."""
    if not time_limit or time_limit < timedelta(minutes=10):
        return None
    return min(120, int(time_limit.total_seconds()) // 10)


def _mem_directive(nbytes: int) -> str:
    return f"{math.ceil(nbytes / 2**20)}M"  # Slurm's M is MiB


def gpu_gres(req: GpuRequest, gres: list[str] | None) -> tuple[str | None, str | None]:
    """(--gpus-per-node value, problem) for `req` given the nodes' gres strings from sinfo.

    With gres=None (not asked, e.g. dry run) the value is rendered without checking.
    """
    if req.count == 0:
        return None, None
    if gres is None:
        return (f"{req.type.lower()}:{req.count}" if req.type else str(req.count)), None
    offers: dict[str, int] = {}  # GPU type ("" = untyped) -> most per node
    for g in gres:
        for item in g.split(","):
            m = re.match(r"gpu(?::([^:(]+))?:(\d+)", item.strip())
            if m:
                t = m.group(1) or ""
                offers[t] = max(offers.get(t, 0), int(m.group(2)))
    if not offers:
        return None, (f"--gpus {req}: the Slurm partition offers no GPUs (sinfo gres: "
                      f"{','.join(gres) or 'none'}); use --gpus 0 or another partition")
    if req.type:
        match = [t for t in offers if t and req.type.lower() in t.lower()]
        if not match:
            return None, (f"--gpus {req}: the Slurm partition has no {req.type} GPUs "
                          f"(types: {', '.join(t for t in offers if t) or 'untyped'}); pick one of those")
        site_type = match[0]
        have = offers[site_type]
        value = f"{site_type}:{req.count}"
    else:
        have = max(offers.values())
        value = str(req.count)
    if have < req.count:
        return None, f"--gpus {req}: Slurm nodes here have at most {have}; ask for {have} or fewer per node"
    return value, None


def node_gres(scontrol_nodes: str, partition: str | None) -> list[str]:
    """The Gres of each node (of `partition`, else all) in `scontrol show node -o` output (pure)."""
    out = []
    for line in scontrol_nodes.splitlines():
        rec = parse_record(line) if line.strip() else {}
        if partition and partition not in rec.get("Partitions", "").split(","):
            continue
        if rec.get("Gres") not in (None, "", "(null)"):
            out.append(rec["Gres"])
    return out


def render_script(spec: JobSpec, target: SlurmTarget, *, python: str, gres: list[str] | None = None) -> str:
    """The sbatch script for a stage (pure)."""
    gpus, problem = gpu_gres(spec.gpus, gres)
    if problem:
        raise BackendError(problem)
    out = spec.log_dir / "slurm" / f"{spec.name}-%j.out"
    d = [
        f"--job-name={spec.name}",
        f"--comment={COMMENT}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the ranks
    ]
    if spec.cpus:
        d.append(f"--cpus-per-task={spec.cpus}")
    if gpus:
        d.append(f"--gpus-per-node={gpus}")
    if spec.memory_bytes:
        d.append(f"--mem={_mem_directive(spec.memory_bytes)}")
    time_limit = spec.time_limit or target.time
    if time_limit:
        d.append(f"--time={duration_text(time_limit)}")
    lead = signal_lead(time_limit)
    if lead:
        d.append(f"--signal=B:USR1@{lead}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(target, key):
            d.append(f"--{key}={getattr(target, key)}")
    d += [f"--output={out}", "--open-mode=append", f"--chdir={spec.workdir}", "--requeue"]
    d += list(target.extra_directives)

    bad = next((x for x in d if any(ch in x for ch in "\n\r\0")), None)
    if bad is not None:  # config.py refuses these at the edge; a directive must stay one line
        raise BackendError(f"sbatch directive {bad[:80]!r} spans lines; refused")
    lines = ["#!/bin/bash", *(f"#SBATCH {x}" for x in d), "set -euo pipefail"]
    c = target.container
    if c is None:
        # The project's own environment: its bin dir holds python, torchrun and the project's tools.
        lines.append(f'export PATH={shlex.quote(str(Path(python).parent))}:"$PATH"')
        host_python, seen_at = python, None
    else:  # the project's interpreter (and torchcapsule, which starts torchrun) is in the image
        host_python, seen_at = "python3", {k: CONTAINER_MOUNTS[k] for k in spec.volumes}
    inner, env = stage_command(spec, python=python if c is None else "python",
                               rdzv_endpoint="$head_node:$port", rdzv_id="$SLURM_JOB_ID",
                               mounts=seen_at, cpu_count=spec.cpus)
    for k, v in env.items():
        if not ENV_KEY_RE.fullmatch(k):  # pasted unquoted: only a plain name may get here
            raise BackendError(f"env key {k[:80]!r} is not a variable name; refused")
        lines.append(f"export {k}={shlex.quote(v)}")
    if spec.distributed == "ddp":
        lines += [
            # Rendezvous on the allocation's first node (where this script runs), on a free port;
            # the same path serves one node and many.
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "port=$(" + shlex.quote(host_python)
            + " -c 'import socket; s=socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])')",
            f'echo "torchcapsule: rendezvous $head_node:$port, {spec.nodes} node(s)"',
        ]
    lines.append('echo "torchcapsule: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST '
                 '(restart ${SLURM_RESTART_COUNT:-0})"')
    # Several nodes: each output line starts with its node's task number ("1: ..."), so the one
    # log tells the nodes apart.
    srun = ["srun", "--kill-on-bad-exit=1", *(["--label"] if spec.nodes > 1 else [])]
    if c is not None:
        image = c.image or spec.image
        mounts = ",".join(f"{h}:{CONTAINER_MOUNTS[k]}" for k, h in spec.volumes.items())
        workdir = _in_container(spec)
        if c.runtime == "pyxis":
            srun += [f"--container-image={image}", f"--container-mounts={mounts}",
                     f"--container-workdir={workdir}"]
        else:  # apptainer: a .sif path or a URI; a bare registry reference means docker://
            if "://" not in image and not image.endswith(".sif"):
                image = f"docker://{image}"
            srun += ["apptainer", "exec", *(["--nv"] if spec.gpus.count else []),
                     "--bind", mounts, "--pwd", workdir, image]
    step = shell_join(srun + inner)
    if signal_lead(time_limit):
        lines += [
            # USR1 comes signal_lead() before the time limit: requeue; Slurm then SIGTERMs the
            # ranks (they save a checkpoint) and the job restarts later from that checkpoint.
            "trap 'echo \"torchcapsule: time limit near: requeueing from the last checkpoint\"; "
            "scontrol requeue \"$SLURM_JOB_ID\"' USR1",
            f"{step} &",
            "step_pid=$!",
            # `wait` returns early when a trap runs: wait again until srun itself has ended.
            'while true; do wait "$step_pid" && rc=0 || rc=$?; kill -0 "$step_pid" 2>/dev/null || break; done',
            'exit "$rc"',
        ]
    else:
        # exec: the job's exit code is srun's, the worst exit code of its tasks.
        lines.append("exec " + step)
    return "\n".join(lines) + "\n"


def _in_container(spec: JobSpec) -> str:
    try:
        rel = spec.workdir.relative_to(spec.volumes["workspace"])
    except ValueError:
        return CONTAINER_MOUNTS["workspace"]
    return str(Path(CONTAINER_MOUNTS["workspace"]) / rel)


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol show job -o` line -> {key: value} (values may hold spaces)."""
    parts = re.split(r" (?=[A-Za-z/:]+=)", line.strip())
    out: dict[str, str] = {}
    for p in parts:
        k, sep, v = p.partition("=")
        if sep:
            out[k] = v.strip()
    return out


def job_status(rec: dict[str, str], job_id: str, log_tail: str = "") -> JobStatus:
    """A scontrol record -> JobStatus (pure)."""
    raw = rec.get("JobState", "")
    state = SLURM_STATES.get(raw, JobState.UNKNOWN)
    code: int | None = None
    m = re.match(r"(\d+):(\d+)", rec.get("ExitCode", ""))
    if m and state.terminal:
        code, sig = int(m.group(1)), int(m.group(2))
        if sig and not code:
            code = 128 + sig
    reason = rec.get("Reason")
    reason = None if reason in (None, "None", "(null)") else reason
    if state is JobState.FAILED:
        if code == 0:
            code = None  # failed without an exit status (node failure, timeout): do not read 0
        code, reason = explain_failure(code, log_tail, context=(f"Slurm state {raw}", reason))
        state = ended_state(code)
    return JobStatus(job_id, state, code, reason, name=rec.get("JobName"),
                     started_at=timestamp(rec.get("StartTime")), finished_at=timestamp(rec.get("EndTime")))


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, project: Project | None = None, target: SlurmTarget | None = None) -> None:
        self.target = target or (project.targets.slurm if project else SlurmTarget())

    @property
    def pulls_image(self) -> bool:  # type: ignore[override]
        """With a container runtime the nodes pull the project image (unless one is named)."""
        return self.target.container is not None and not self.target.container.image

    @property
    def python(self) -> str:
        return self.target.python or sys.executable

    # -- effects -------------------------------------------------------------------------------
    def check_available(self) -> None:
        fix = "install Slurm's client commands (apt-get install slurm-client) and point slurm.conf at your cluster"
        _proc.require("sbatch", fix)
        r = _proc.run(["sinfo", "-h", "-o", "%P"], timeout=30)
        if r.returncode != 0:
            raise BackendError(f"Slurm does not answer (`sinfo`: {_proc.first_line(r.stderr)}); "
                               "start slurmctld or check SLURM_CONF")
        parts = [p.rstrip("*") for p in r.stdout.split()]
        if self.target.partition and self.target.partition not in parts:
            raise BackendError(f"targets.slurm.partition: no partition '{self.target.partition}'; "
                               f"partitions: {', '.join(parts)}")

    def _gres(self) -> list[str]:
        r = _proc.run(["scontrol", "show", "node", "-o"], timeout=30)
        return node_gres(r.stdout, self.target.partition)

    def dryrun(self, spec: JobSpec) -> DryRun:
        script = render_script(spec, self.target, python=self.python)
        return DryRun(self.name, spec, script, script)

    def schedule(self, dryrun: DryRun) -> str:
        spec = dryrun.spec
        script = dryrun.request
        if spec.gpus.count:  # only now may we ask the cluster what it has, and submit what was checked
            script = render_script(spec, self.target, python=self.python, gres=self._gres())
        (spec.log_dir / "slurm").mkdir(parents=True, exist_ok=True)
        r = _proc.run(["sbatch", "--parsable"], stdin=script, timeout=60)
        if r.returncode != 0:
            raise BackendError(f"sbatch refused the job: {_proc.first_line(r.stderr)}")
        return self.job_id(r.stdout.strip().split(";")[0])

    def native(self, job_id: str) -> str:
        native = super().native(job_id)
        if not native.isdigit():
            raise JobNotFound(f"'{job_id}' is not a Slurm job id (slurm:NUMBER); see `capsule jobs list`")
        return native

    def _record(self, native: str) -> dict[str, str]:
        r = _proc.run(["scontrol", "show", "job", "-o", native], timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            return parse_record(r.stdout.splitlines()[0])
        rec = self._sacct(native)
        if rec is None:
            raise JobNotFound(f"Slurm does not know job {native} (finished jobs leave scontrol after "
                              "MinJobAge and there is no accounting); see `capsule jobs list`")
        return rec

    def _sacct(self, native: str) -> dict[str, str] | None:
        import shutil

        if shutil.which("sacct") is None:
            return None
        r = _proc.run(["sacct", "-n", "-X", "-P", "-j", native,
                       "-o", "JobName,State,ExitCode,Reason,Start,End"], timeout=30)
        row = r.stdout.strip().splitlines()
        if r.returncode != 0 or not row:
            return None
        name, state, code, reason, start, end = (row[0].split("|") + [""] * 6)[:6]
        return {"JobName": name, "JobState": state.split()[0], "ExitCode": code, "Reason": reason,
                "StartTime": start, "EndTime": end}

    def status(self, job_id: str) -> JobStatus:
        native = self.native(job_id)
        rec = self._record(native)
        tail = ""
        if SLURM_STATES.get(rec.get("JobState", "")) is JobState.FAILED and rec.get("StdOut"):
            tail = _proc.tail(Path(rec["StdOut"]), 80)
        return job_status(rec, self.job_id(native), tail)

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        native = self.native(job_id)
        out = self._record(native).get("StdOut")
        if not out:
            raise JobNotFound(f"Slurm job {native} has no output file recorded; it was not started by torchcapsule")
        path = Path(out)
        if not follow:
            if not path.exists():
                return  # pending: nothing written yet
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    yield line.rstrip("\n")
            return
        yield from _proc.follow_file(path, lambda: self.status(job_id).state.terminal)

    def _cancel_existing(self, native: str) -> None:
        r = _proc.run(["scancel", native], timeout=30)
        if r.returncode != 0 and "already completing or completed" not in r.stderr:
            raise BackendError(f"scancel {native} failed: {_proc.first_line(r.stderr)}")

    def list(self) -> list[JobStatus]:
        r = _proc.run(["scontrol", "show", "job", "-o"], timeout=30)
        out = []
        for line in r.stdout.splitlines():
            rec = parse_record(line)
            if rec.get("Comment") == COMMENT and "JobId" in rec:
                out.append(job_status(rec, self.job_id(rec["JobId"])))
        return out
