"""Docker backend: the stage in the project image on the local Docker engine.

dryrun() renders the exact `docker run` argv (pure); schedule() runs it detached. The container
keeps its name and labels so `capsule jobs` finds it again; nothing is removed automatically,
so status, exit code and logs stay readable after the job ends (`docker rm` cleans up).

Several nodes (`--nodes N`): one container per node on this machine, all on the host network,
each running the stage's torchrun with `--nnodes N` and one c10d rendezvous on 127.0.0.1 (a port
picked at submit). The job id names the group (`docker:<job>`); its containers are `<job>-nodeI`,
labelled with the group and their node index. The job's state is the worst of its nodes'.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

from .._util import free_port, mkdir_owned
from ..config import DockerTarget, GpuRequest, Project
from ..doctor.probes import gpu_names
from ..errors import BackendError, JobNotFound
from . import _proc
from .api import CONTAINER_MOUNTS, Backend, DryRun, JobSpec, JobState, JobStatus, timestamp
from .command import stage_command
from .failure import ended_state, explain_failure

LABEL = "torchcapsule.job"
GROUP_LABEL = "torchcapsule.group"  # several nodes: the job's native id, on each node's container
NODE_LABEL = "torchcapsule.node"  # several nodes: the container's node index
# A failed node ends the job: its other nodes get SIGTERM, then SIGKILL after this (the failure
# already decided the outcome; their checkpoint collective cannot complete without the failed node).
TEARDOWN_GRACE_S = 10

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


def gpu_problem(req: GpuRequest, names: list[str] | None, nodes: int = 1) -> str | None:
    """Why this machine cannot give `req` to each of `nodes` containers (None when it can).
    `names`: doctor.probes.gpu_names(). Node i gets GPUs i*count .. (i+1)*count-1 (node_devices)."""
    if req.count == 0:
        return None
    asked = f"--gpus {req}" + (f" x --nodes {nodes}" if nodes > 1 else "")
    if not names:
        return (f"{asked}: this machine has no NVIDIA GPU (nvidia-smi found none); "
                "use --gpus 0 or run on slurm/kubernetes")
    want = req.count * nodes
    if req.type:
        matching = [n for n in names if _is_type(n, req.type)]
        if not matching:
            return f"{asked}: no {req.type} on this machine; use --gpus {req.count} or another backend"
        if nodes > 1 and not all(_is_type(n, req.type) for n in names[:want]):
            return f"{asked}: GPUs 0-{want - 1} are not all {req.type}; use --gpus {req.count} or --nodes 1"
        names = matching
    if len(names) < want:
        fit = len(names) // nodes
        return f"{asked}: only {len(names)} matching GPU(s) here; ask for {fit} or fewer" + \
            (" per node" if nodes > 1 else "")
    return None


def _is_type(name: str, gpu_type: str) -> bool:
    return re.search(rf"\b{re.escape(gpu_type)}\b", name, re.I) is not None


def node_devices(node: int, count: int) -> str:
    """`docker run --gpus` value giving node `node` its own `count` GPUs (quoted: the CLI splits on commas)."""
    return '"device=' + ",".join(str(node * count + k) for k in range(count)) + '"'


@dataclass(frozen=True)
class Node:
    """One node of a several-node job: its index, and what every node needs to find the others."""

    index: int
    job: str  # the group: the job's native id
    hosts: tuple[tuple[str, str], ...]  # (hostname, address) of every node, index order
    rdzv_endpoint: str

    @property
    def hostname(self) -> str:
        return self.hosts[self.index][0]


def node_names(job: str, nodes: int) -> list[str]:
    """Container names of a several-node job, node order (zero-padded: they sort as the nodes)."""
    width = len(str(nodes - 1))
    return [f"{job}-node{i:0{width}d}" for i in range(nodes)]


def node_hosts(spec: JobSpec) -> tuple[tuple[str, str], ...]:
    """(hostname, address) per node. Host networking shares one name and network between the
    containers, and each container's torchrun has the same PID: c10d would see one node N times
    (its node id is host name + PID). So each node gets its own hostname (it names the node in
    torchrun's failure summary) on its own loopback address, listed in every node's /etc/hosts:
    the ranks reach each other through those names over `lo`. Sorted names give c10d's node
    ranks in node order."""
    width = len(str(spec.nodes - 1))
    base = re.sub(r"[^a-z0-9.-]", "-", spec.name.lower())[:63 - 5 - width].strip(".-") or "capsule"
    return tuple((f"{base}-node{i:0{width}d}", f"127.77.{i // 250}.{i % 250 + 1}") for i in range(spec.nodes))


def render_argv(spec: JobSpec, target: DockerTarget, name: str, uid: int, gid: int,
                node: Node | None = None) -> list[str]:
    """The `docker run` argv for a stage (pure); `node`: that node's container of a several-node job."""
    # The stage runs as itself: not through the image's interactive entrypoint (which starts
    # Jupyter/sshd and drops to the image's user); --init puts tini first to forward SIGTERM.
    argv = ["docker", "run", "--detach", "--name", name, "--init", "--entrypoint="]
    labels = {**spec.labels, LABEL: spec.name}
    if node is not None:
        labels.update({GROUP_LABEL: node.job, NODE_LABEL: str(node.index)})
    for k, v in labels.items():
        argv += ["--label", f"{k}={v}"]
    if node is not None:  # the nodes meet on the host network (the only one shared here)
        argv += ["--network=host", f"--hostname={node.hostname}"]
        argv += [f"--add-host={host}:{addr}" for host, addr in node.hosts]
    elif target.network:
        argv.append(f"--network={target.network}")
    if node is None and target.network != "host":
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
        argv += ["--gpus", str(spec.gpus.count) if node is None else node_devices(node.index, spec.gpus.count)]
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
    rdzv = {} if node is None else {"rdzv_endpoint": node.rdzv_endpoint, "rdzv_id": node.job}
    command, env = stage_command(spec, mounts={k: CONTAINER_MOUNTS[k] for k in spec.volumes},
                                 cpu_count=spec.cpus, **rdzv)
    # HOME: the host UID has no home in the image; caches (torch, pip) need a writable one.
    for k, v in {"HOME": "/tmp", **env}.items():
        argv += ["--env", f"{k}={v}"]
    argv += list(target.extra_args)
    argv.append(spec.image)
    return argv + command


def render_node_argvs(spec: JobSpec, target: DockerTarget, job: str, uid: int, gid: int,
                      rdzv_port: int) -> list[list[str]]:
    """One `docker run` argv per node of a several-node job (pure): node i is container
    `<job>-nodeI`; every node's torchrun meets at the c10d rendezvous 127.0.0.1:rdzv_port."""
    if target.network not in (None, "host"):
        raise BackendError(f"targets.docker.network: {target.network}: --nodes {spec.nodes} runs its "
                           "containers on the host network; remove targets.docker.network or use --nodes 1")
    hosts = node_hosts(spec)
    return [render_argv(spec, target, name, uid, gid, Node(i, job, hosts, f"127.0.0.1:{rdzv_port}"))
            for i, name in enumerate(node_names(job, spec.nodes))]


@dataclass(frozen=True)
class NodesRequest:
    """What schedule() starts for a several-node job: the group's id and one argv per node."""

    job: str
    argvs: list[list[str]]


def _container_path(spec: JobSpec, host: Path) -> str | None:
    """Host path -> the same file inside the container (via the workspace mount), or None."""
    ws = spec.volumes["workspace"]
    try:
        rel = Path(host).resolve().relative_to(ws)
    except ValueError:
        return None
    return str(Path(CONTAINER_MOUNTS["workspace"]) / rel)


def job_status(info: dict, job_id: str, *, cancelled: bool, log: str = "", node: str | None = None) -> JobStatus:
    """`docker inspect` of a container (+ the end of its log when it failed) -> JobStatus (pure).
    node: which node of a several-node job the container is (named first in a failure's reason)."""
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
            code, reason = explain_failure(code or None, log, context=(node, reason))
            state = ended_state(code)
    name = info.get("Name", "").lstrip("/")
    return JobStatus(job_id, state, code, reason, name=((info.get("Config") or {}).get("Labels") or {}).get(LABEL, name),
                     started_at=timestamp(st.get("StartedAt")), finished_at=timestamp(st.get("FinishedAt")))


def node_label(info: dict) -> str:
    """How a failure names a node's container: `node 1 of 2 (<container>)`."""
    labels = (info.get("Config") or {}).get("Labels") or {}
    return f"node {labels.get(NODE_LABEL, '?')} ({info.get('Name', '').lstrip('/')})"


def group_status(job_id: str, nodes: Sequence[JobStatus]) -> JobStatus:
    """The job's status from its nodes' (node order), the worst of them (pure): a failed node fails
    the job at once (the first one to end names the cause and gives the exit code), then a node
    not ended yet keeps it PENDING/RUNNING, then a cancelled (or preempted) node makes it
    CANCELLED; SUCCEEDED only when every node did."""
    started = [s.started_at for s in nodes if s.started_at is not None]
    ended = [s.finished_at for s in nodes if s.finished_at is not None]
    times = {"started_at": min(started) if started else None,
             "finished_at": max(ended) if len(ended) == len(nodes) else None}
    failed = [s for s in nodes if s.state is JobState.FAILED]
    if failed:
        first = min(failed, key=lambda s: s.finished_at if s.finished_at is not None else math.inf)
        return replace(first, job_id=job_id, started_at=times["started_at"], finished_at=first.finished_at)
    states = {s.state for s in nodes}
    if not all(s.terminal for s in states):
        if states <= {JobState.PENDING}:
            state = JobState.PENDING
        elif JobState.UNKNOWN in states and JobState.RUNNING not in states:
            state = JobState.UNKNOWN
        else:
            state = JobState.RUNNING
        return JobStatus(job_id, state, name=nodes[0].name, started_at=times["started_at"])
    cancelled = [s for s in nodes if s.state is JobState.CANCELLED]
    if cancelled:
        return replace(cancelled[0], job_id=job_id, **times)
    return JobStatus(job_id, JobState.SUCCEEDED, 0, name=nodes[0].name, **times)


def merge_logs(logs: Sequence[str]) -> list[str]:
    """Several nodes' `docker logs --timestamps` -> one log in time order, each line led by its
    node's index as `srun --label` does (`1: [rank0]:...`: launch/failure.py reads both) (pure)."""
    lines = []
    for node, text in enumerate(logs):
        for n, line in enumerate(text.splitlines()):
            if not line:  # where stdout and stderr were joined; a log line has its timestamp
                continue
            stamp, _, rest = line.partition(" ")
            lines.append((timestamp(stamp) or 0.0, node, n, f"{node}: {rest}"))
    return [line for *_, line in sorted(lines)]


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
        if spec.nodes > 1:  # the rendezvous port is picked now, as the local backend does
            req = NodesRequest(container_name(spec), [])
            req.argvs.extend(render_node_argvs(spec, self.target, req.job, self.uid, self.gid, free_port()))
            return DryRun(self.name, spec, "\n".join(shlex.join(a) for a in req.argvs), req)
        argv = render_argv(spec, self.target, container_name(spec), self.uid, self.gid)
        return DryRun(self.name, spec, shlex.join(argv), argv)

    def schedule(self, dryrun: DryRun) -> str:
        spec = dryrun.spec
        problem = gpu_problem(spec.gpus, gpu_names(), spec.nodes) if spec.gpus.count else None
        if problem:
            raise BackendError(problem)
        if self._docker("image", "inspect", spec.image, timeout=20).returncode != 0:
            raise BackendError(f"image '{spec.image}' is not in the local Docker engine; "
                               "build it with `capsule image build`")
        for host in spec.volumes.values():  # else dockerd creates them, owned by root
            mkdir_owned(host, self.uid, self.gid)  # the job's user must be able to write there
        if isinstance(dryrun.request, NodesRequest):
            req = dryrun.request
            for i, argv in enumerate(req.argvs):
                r = _proc.run(argv, timeout=120)
                if r.returncode != 0:  # no half-started job: the nodes already up would wait for it
                    started = node_names(req.job, len(req.argvs))[:i]
                    if started:
                        self._docker("rm", "--force", *started, timeout=90)
                    raise BackendError(f"docker run refused node {i} of the job: {_proc.first_line(r.stderr)}")
            return self.job_id(req.job)
        argv = dryrun.request
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

    def _containers(self, native: str) -> list[dict]:
        """The job's containers: the one named `native`, or the nodes of group `native` (node order)."""
        r = self._docker("inspect", "--type", "container", native)
        if r.returncode == 0 and r.stdout.strip().startswith("["):
            return json.loads(r.stdout)
        r = self._docker("ps", "--all", "--filter", f"label={GROUP_LABEL}={native}", "--format", "{{.Names}}")
        return sorted(self._inspect(r.stdout.split() or [native]), key=_node_index)

    def _status(self, info: dict, job_id: str | None = None) -> JobStatus:
        name = info["Name"].lstrip("/")
        job_id = job_id or self.job_id(name)
        node = node_label(info) if _group(info) else None
        cancelled = (_cancel_dir() / name).exists()
        st = job_status(info, job_id, cancelled=cancelled, node=node)
        if st.state is JobState.FAILED:  # the end of its log names the failing rank and its code
            st = job_status(info, job_id, cancelled=cancelled, log=self._log_tail(name, 80) or "", node=node)
        return st

    def _job_status(self, infos: list[dict]) -> JobStatus:
        """One job's status from its containers; a failed node ends the others (teardown)."""
        group = _group(infos[0])
        if not group:
            return self._status(infos[0])
        job_id = self.job_id(group)
        nodes = [self._status(info, job_id) for info in infos]
        st = group_status(job_id, nodes)
        alive = [info["Name"].lstrip("/") for info, n in zip(infos, nodes) if not n.state.terminal]
        if st.state is JobState.FAILED and alive:
            # Docker has no --kill-on-bad-exit: the other nodes' ranks may wait on the failed one
            # for a long time (gloo's timeout), or never notice (no collective).
            self._docker("stop", "--time", str(TEARDOWN_GRACE_S), *alive, timeout=TEARDOWN_GRACE_S + 60)
        return st

    def _log_tail(self, name: str, lines: int = 20) -> str | None:
        r = self._docker("logs", "--tail", str(lines), name)
        return (r.stdout + r.stderr).strip() or None

    def status(self, job_id: str) -> JobStatus:
        return self._job_status(self._containers(self.native(job_id)))

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        infos = self._containers(self.native(job_id))  # one-line JobNotFound rather than docker's message
        names = [i["Name"].lstrip("/") for i in infos]
        if not _group(infos[0]):
            yield from _proc.stream([self.docker, "logs", *(["--follow"] if follow else []), names[0]])
            return
        if not follow:
            # stdout and stderr come apart; the timestamps put them (and the nodes) back in order
            runs = [self._docker("logs", "--timestamps", n, timeout=120) for n in names]
            yield from merge_logs([r.stdout + "\n" + r.stderr for r in runs])
            return
        ended = 0
        for node, line in _proc.stream_many([[self.docker, "logs", "--follow", n] for n in names]):
            if line is not None:
                yield f"{node}: {line}"
                continue
            ended += 1
            if ended < len(names):
                self.status(job_id)  # a node that failed ends the others, and so their logs

    def _cancel_existing(self, native: str) -> None:
        names = [i["Name"].lstrip("/") for i in self._containers(native)]
        for name in names:
            marker = _cancel_dir() / name
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        # SIGTERM first (the checkpointer saves), SIGKILL after the grace period; all nodes at once.
        r = self._docker("stop", "--time", "30", *names, timeout=90)
        if r.returncode != 0:
            raise BackendError(f"docker stop {' '.join(names)} failed: {_proc.first_line(r.stderr)}")

    def list(self) -> list[JobStatus]:
        r = self._docker("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
        names = r.stdout.split()
        jobs: dict[str, list[dict]] = {}  # a several-node job's containers under its group
        for info in self._inspect(names) if names else []:
            jobs.setdefault(_group(info) or info["Name"], []).append(info)
        return [self._job_status(sorted(infos, key=_node_index)) for infos in jobs.values()]


def _group(info: dict) -> str | None:
    return ((info.get("Config") or {}).get("Labels") or {}).get(GROUP_LABEL)


def _node_index(info: dict) -> int:
    return int(((info.get("Config") or {}).get("Labels") or {}).get(NODE_LABEL, 0))
