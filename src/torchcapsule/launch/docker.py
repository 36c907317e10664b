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

from ..config import DockerTarget, GpuRequest, Project
from ..errors import BackendError, JobNotFound
from . import _proc
from ._command import explain_failure, nproc, stage_argv
from .api import CONTAINER_MOUNTS, Backend, DryRun, JobSpec, JobState, JobStatus
from .torchrun import stage_env

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
    """Why this machine cannot give `req` (None when it can). `names` from nvidia-smi, None = no GPU."""
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
    mounts = {k: CONTAINER_MOUNTS[k] for k in spec.volumes}
    # HOME: the host UID has no home in the image; caches (torch, pip) need a writable one.
    env = {"HOME": "/tmp", **stage_env(spec, mounts=mounts, nproc=nproc(spec), cpu_count=spec.cpus)}
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    argv += list(target.extra_args)
    argv.append(spec.image)
    return argv + stage_argv(spec)


def _container_path(spec: JobSpec, host: Path) -> str | None:
    """Host path -> the same file inside the container (via the workspace mount), or None."""
    ws = spec.volumes["workspace"]
    try:
        rel = Path(host).resolve().relative_to(ws)
    except ValueError:
        return None
    return str(Path(CONTAINER_MOUNTS["workspace"]) / rel)


def state_of(st: dict, cancelled: bool) -> tuple[JobState, int | None, str | None]:
    """`docker inspect` .State -> (JobState, exit code, reason) (pure)."""
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
            code = code or None  # failed without an exit status: never report 0
            if st.get("OOMKilled"):
                reason = "killed by the kernel: out of memory (raise resources.memory)"
    return state, code, reason


def _ts(text: str | None) -> float | None:
    if not text or text.startswith("0001-"):
        return None
    try:  # Docker gives nanoseconds; fromisoformat takes at most microseconds
        text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


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

    def gpu_names(self) -> list[str] | None:
        import shutil

        if shutil.which("nvidia-smi") is None:
            return None
        r = _proc.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], timeout=20)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else None

    def dryrun(self, spec: JobSpec) -> DryRun:
        if spec.nodes != 1:
            raise BackendError(f"--nodes {spec.nodes}: the docker backend runs on this one machine; "
                               "use --nodes 1 or --on slurm/kubernetes")
        argv = render_argv(spec, self.target, container_name(spec), self.uid, self.gid)
        return DryRun(self.name, spec, shlex.join(argv), argv)

    def schedule(self, dryrun: DryRun) -> str:
        spec, argv = dryrun.spec, dryrun.request
        problem = gpu_problem(spec.gpus, self.gpu_names())
        if problem:
            raise BackendError(problem)
        if self._docker("image", "inspect", spec.image, timeout=20).returncode != 0:
            raise BackendError(f"image '{spec.image}' is not in the local Docker engine; "
                               "build it with `capsule image build`")
        for host in spec.volumes.values():  # else dockerd creates them, owned by root
            if not host.exists():
                host.mkdir(parents=True)
                if os.geteuid() == 0 and (self.uid, self.gid) != (0, 0):
                    os.chown(host, self.uid, self.gid)  # the job's user must be able to write there
        r = _proc.run(argv, timeout=120)
        if r.returncode != 0:
            raise BackendError(f"docker run refused the job: {_proc.first_line(r.stderr)}")
        return self.job_id(argv[argv.index("--name") + 1])

    def _native(self, job_id: str) -> str:
        name, sep, native = job_id.partition(":")
        if sep and name == self.name:
            return native
        return job_id

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
        st = info["State"]
        state, code, reason = state_of(st, (_cancel_dir() / name).exists())
        if state is JobState.FAILED:
            log = self._log_tail(name, 80) or ""
            code, why = explain_failure(code, log)
            tail = "\n".join(log.splitlines()[-20:])
            reason = "; ".join(x for x in (reason, why) if x) + (f"\n{tail}" if tail else "")
        return JobStatus(self.job_id(name), state, code, reason,
                         name=info["Config"]["Labels"].get(LABEL, name),
                         started_at=_ts(st.get("StartedAt")), finished_at=_ts(st.get("FinishedAt")))

    def _log_tail(self, name: str, lines: int = 20) -> str | None:
        r = self._docker("logs", "--tail", str(lines), name)
        return (r.stdout + r.stderr).strip() or None

    def status(self, job_id: str) -> JobStatus:
        return self._status(self._inspect([self._native(job_id)])[0])

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        name = self._native(job_id)
        self._inspect([name])  # one-line JobNotFound rather than docker's message
        yield from _proc.stream([self.docker, "logs", *(["--follow"] if follow else []), name])

    def cancel(self, job_id: str) -> None:
        name = self._native(job_id)
        info = self._inspect([name])[0]
        if not info["State"].get("Running") and info["State"].get("Status") != "created":
            return  # already finished: keep its real outcome
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
