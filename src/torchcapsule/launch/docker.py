"""Docker backend: the stage in the project image on the local Docker engine.

dryrun() renders the exact `docker run` argv (pure); schedule() runs it detached. The container
keeps its name and labels so `capsule jobs` finds it again; nothing is removed automatically,
so status, exit code and logs stay readable after the job ends (`docker rm` cleans up).
"""
from __future__ import annotations

import json
import os
import re
import shlex
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .._util import mkdir_owned
from ..config import DockerTarget, GpuRequest, Project
from ..doctor.probes import gpu_names
from ..errors import BackendError, JobNotFound
from . import _proc
from .api import CONTAINER_MOUNTS, Backend, DryRun, JobSpec, JobState, JobStatus, timestamp
from .command import stage_command
from .failure import ended_state, explain_failure

LABEL = "torchcapsule.job"

# `docker inspect` .State.Status -> JobState; "exited"/"dead" are decided by the exit code.
DOCKER_STATES: dict[str, JobState] = {
    "created": JobState.PENDING,
    "running": JobState.RUNNING,
    "restarting": JobState.RUNNING,  # restart policy retrying a failed attempt
    "paused": JobState.RUNNING,
    "removing": JobState.CANCELLED,
    "exited": JobState.SUCCEEDED,
    "dead": JobState.FAILED,
}


def _cancel_dir() -> Path:
    # Docker records no "who stopped it": `cancel` leaves a marker so a stopped container
    # reads CANCELLED rather than FAILED with exit 143.
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "torchcapsule" / "cancelled" / "docker"


def container_name(spec: JobSpec, now: datetime | None = None) -> str:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{spec.name}-{stamp}-{os.urandom(2).hex()}"


def gpu_problem(req: GpuRequest, names: list[str] | None) -> str | None:
    """Why this machine cannot give `req` (None when it can). `names`: doctor.probes.gpu_names()."""
    if req.count == 0:
        return None
    if not names:
        return (f"--gpus {req}: this machine has no NVIDIA GPU (nvidia-smi found none); "
                "use --gpus 0 or run on slurm/kubernetes")
    if req.type:
        names = [n for n in names if re.search(rf"\b{re.escape(req.type)}\b", n, re.I)]
        if not names:
            return f"--gpus {req}: no {req.type} on this machine; use --gpus {req.count} or another backend"
    if len(names) < req.count:
        return f"--gpus {req}: only {len(names)} matching GPU(s) here; ask for {len(names)} or fewer"
    return None


def render_argv(spec: JobSpec, target: DockerTarget, name: str, uid: int, gid: int) -> list[str]:
    """The `docker run` argv for a stage (pure)."""
    # The stage runs as itself: not through the image's interactive entrypoint (which starts
    # Jupyter/sshd and drops to the image's user); --init puts tini first to forward SIGTERM.
    argv = ["docker", "run", "--detach", "--name", name, "--init", "--entrypoint="]
    for k, v in {**spec.labels, LABEL: spec.name}.items():
        argv += ["--label", f"{k}={v}"]
    if target.network:
        argv.append(f"--network={target.network}")
    if target.network != "host":
        # torchrun's rendezvous looks up the machine's own hostname; a container's id-hostname
        # does not resolve without a DNS-providing network (c10d then waits out its timeout).
        argv.append("--hostname=localhost")
    # NCCL/gloo and DataLoader workers share tensors through /dev/shm; Docker's default is 64 MB.
    if target.ipc_host:
        argv.append("--ipc=host")
    elif spec.shm_bytes:
        argv.append(f"--shm-size={spec.shm_bytes}")
    # Files written to the volumes belong to the host user (not root, not the image's user);
    # a stage needs no capability and may never gain privileges (setuid files in a volume).
    argv += ["--user", f"{uid}:{gid}", "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
    if spec.gpus.count:
        argv += ["--gpus", str(spec.gpus.count)]
    if spec.cpus:
        argv.append(f"--cpus={spec.cpus}")
    if spec.memory_bytes:
        argv.append(f"--memory={spec.memory_bytes}")
    if spec.retries and spec.distributed != "ddp":  # ddp stages retry inside torchrun
        argv.append(f"--restart=on-failure:{spec.retries}")
    for vol, host in spec.volumes.items():
        argv += ["--volume", f"{host}:{CONTAINER_MOUNTS[vol]}"]
    workdir = _container_path(spec, spec.workdir)
    if workdir is None:
        argv += ["--volume", f"{spec.workdir}:{spec.workdir}"]
        workdir = str(spec.workdir)
    argv += ["--workdir", workdir]
    command, env = stage_command(spec, mounts={k: CONTAINER_MOUNTS[k] for k in spec.volumes}, cpu_count=spec.cpus)
    # HOME: the host UID has no home in the image; caches (torch, pip) need a writable one.
    for k, v in {"HOME": "/tmp", **env}.items():
        argv += ["--env", f"{k}={v}"]
    argv += list(target.extra_args)
    argv.append(spec.image)
    return argv + command


def _container_path(spec: JobSpec, host: Path) -> str | None:
    """Host path -> the same file inside the container (via the workspace mount), or None."""
    ws = spec.volumes["workspace"]
    try:
        rel = Path(host).resolve().relative_to(ws)
    except ValueError:
        return None
    return str(Path(CONTAINER_MOUNTS["workspace"]) / rel)


def job_status(info: dict, job_id: str, *, cancelled: bool, log: str = "") -> JobStatus:
    """`docker inspect` of a container (+ the end of its log when it failed) -> JobStatus (pure)."""
    st = info.get("State") or {}
    status = st.get("Status", "")
    state = DOCKER_STATES.get(status, JobState.UNKNOWN)
    code = st.get("ExitCode") if status in ("exited", "dead") else None
    reason = st.get("Error") or None
    if status in ("exited", "dead"):
        if cancelled:
            state = JobState.CANCELLED
            reason = "cancelled by `capsule jobs cancel`"
        elif code != 0 or st.get("OOMKilled") or status == "dead":
            state = JobState.FAILED
            if st.get("OOMKilled"):
                reason = "killed by the kernel: out of memory (raise resources.memory)"
            # failed without an exit status: never report 0
            code, reason = explain_failure(code or None, log, context=(reason,))
            state = ended_state(code)
    name = info.get("Name", "").lstrip("/")
    return JobStatus(job_id, state, code, reason, name=((info.get("Config") or {}).get("Labels") or {}).get(LABEL, name),
                     started_at=timestamp(st.get("StartedAt")), finished_at=timestamp(st.get("FinishedAt")))


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, project: Project | None = None, target: DockerTarget | None = None,
                 docker: str = "docker", uid: int | None = None, gid: int | None = None) -> None:
        self.target = target or (project.targets.docker if project else DockerTarget())
        self.docker = docker
        # Whose files the job writes: the user running capsule, unless told otherwise.
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid

    # -- effects -------------------------------------------------------------------------------
    def _docker(self, *args: str, timeout: float = 60):
        return _proc.run([self.docker, *args], timeout=timeout)

    def check_available(self) -> None:
        _proc.require(self.docker, "install Docker (apt-get install docker.io) or use --on local")
        r = self._docker("info", "--format", "{{.ServerVersion}}", timeout=20)
        if r.returncode != 0:
            raise BackendError(f"no Docker engine answers ({_proc.first_line(r.stderr)}); "
                               "start dockerd (systemctl start docker) or install Docker")

    def dryrun(self, spec: JobSpec) -> DryRun:
        if spec.nodes != 1:
            raise BackendError(f"--nodes {spec.nodes}: the docker backend runs on this one machine; "
                               "use --nodes 1 or --on slurm/kubernetes")
        argv = render_argv(spec, self.target, container_name(spec), self.uid, self.gid)
        return DryRun(self.name, spec, shlex.join(argv), argv)

    def schedule(self, dryrun: DryRun) -> str:
        spec, argv = dryrun.spec, dryrun.request
        problem = gpu_problem(spec.gpus, gpu_names()) if spec.gpus.count else None
        if problem:
            raise BackendError(problem)
        if self._docker("image", "inspect", spec.image, timeout=20).returncode != 0:
            raise BackendError(f"image '{spec.image}' is not in the local Docker engine; "
                               "build it with `capsule image build`")
        for host in spec.volumes.values():  # else dockerd creates them, owned by root
            mkdir_owned(host, self.uid, self.gid)  # the job's user must be able to write there
        r = _proc.run(argv, timeout=120)
        if r.returncode != 0:
            raise BackendError(f"docker run refused the job: {_proc.first_line(r.stderr)}")
        return self.job_id(argv[argv.index("--name") + 1])

    def _inspect(self, names: list[str]) -> list[dict]:
        r = self._docker("inspect", *names)
        # A missing container: exit 1 with "[]" on stdout (the others, if any, still listed).
        found = json.loads(r.stdout) if r.stdout.strip().startswith("[") else []
        if not found:
            raise JobNotFound(f"no container {names[0]} in the local Docker engine; "
                              "see `capsule jobs list` for job ids")
        return found

    def _status(self, info: dict) -> JobStatus:
        name = info["Name"].lstrip("/")
        cancelled = (_cancel_dir() / name).exists()
        st = job_status(info, self.job_id(name), cancelled=cancelled)
        if st.state is JobState.FAILED:  # the end of its log names the failing rank and its code
            st = job_status(info, self.job_id(name), cancelled=cancelled, log=self._log_tail(name, 80) or "")
        return st

    def _log_tail(self, name: str, lines: int = 20) -> str | None:
        r = self._docker("logs", "--tail", str(lines), name)
        return (r.stdout + r.stderr).strip() or None

    def status(self, job_id: str) -> JobStatus:
        return self._status(self._inspect([self.native(job_id)])[0])

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        name = self.native(job_id)
        self._inspect([name])  # one-line JobNotFound rather than docker's message
        yield from _proc.stream([self.docker, "logs", *(["--follow"] if follow else []), name])

    def _cancel_existing(self, name: str) -> None:
        marker = _cancel_dir() / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        # SIGTERM first (the checkpointer saves), SIGKILL after the grace period.
        r = self._docker("stop", "--time", "30", name, timeout=90)
        if r.returncode != 0:
            raise BackendError(f"docker stop {name} failed: {_proc.first_line(r.stderr)}")

    def list(self) -> list[JobStatus]:
        r = self._docker("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
        names = r.stdout.split()
        return [self._status(i) for i in self._inspect(names)] if names else []
