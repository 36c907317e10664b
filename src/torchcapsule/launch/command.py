"""What a stage runs as: its argv and environment, for every backend (pure: no processes, no probing).

The one reading of a stage's `run:`. A `distributed: ddp` stage runs under torchrun (one launcher
per node, `nproc(spec)` ranks each), always as `python -m torchcapsule.launch.torchrun` (torchrun
that ends a preempted job with 75 instead of restarting it, launch/torchrun.py); any other stage runs its command as written, except that
`python`/`python3` mean the stage's interpreter and a `*.py` script gets it put in front. Each
backend says where things are (its interpreter, its rendezvous, its volume mounts) and calls
`stage_command`; the caller decides the effects (which port is free, how many GPUs there are).

    stage_command(spec, rdzv_endpoint="127.0.0.1:41234")[0]
    -> ["python", "-m", "torchcapsule.launch.torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "127.0.0.1:41234", "--rdzv_id", "digits-train", "--max_restarts", "2",
        ..., "train.py", "--epochs", "30"]
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path, PurePath
from typing import Mapping, Sequence

from ..errors import BackendError, ConfigError
from .api import JobSpec

# Interpreter names a stage's `run` may start with ("python train.py" == "train.py").
_PYTHONS = ("python", "python3") + tuple(f"python3.{m}" for m in range(8, 20))
RDZV_PORT = 29500  # Kubernetes only: the headless Service needs a port known in advance
LOCAL_RDZV = "localhost:0"  # one node: c10d binds a free port itself (what --standalone does)
TORCHRUN = "torchcapsule.launch.torchrun"  # torchrun, run as `python -m` wherever torchcapsule is installed


def entrypoint(command: Sequence[str], *, stage: str = "?") -> list[str]:
    """A stage's `run` argv -> what follows torchrun's options: [script, args...] or ["-m", mod, args...].

    Accepts `train.py ...`, `python train.py ...`, `python -m pkg.mod ...` and `-m pkg.mod ...`.
    """
    argv = list(command)
    if argv and PurePath(argv[0]).name in _PYTHONS:
        argv = argv[1:]
    if not argv:
        raise ConfigError(f"stages.{stage}.run: a ddp stage needs a script, e.g. `train.py --epochs 30`")
    if argv[0] in ("-m", "--module"):
        if len(argv) < 2:
            raise ConfigError(f"stages.{stage}.run: `-m` needs a module name, e.g. `-m mypkg.train`")
        return ["-m", *argv[1:]]
    if argv[0].startswith("-"):
        raise ConfigError(
            f"stages.{stage}.run: a ddp stage runs a Python script or `-m module` under torchrun, "
            f"not the interpreter option '{argv[0]}'"
        )
    if not argv[0].endswith(".py"):
        raise ConfigError(
            f"stages.{stage}.run: a ddp stage runs a Python script under torchrun; "
            f"'{argv[0]}' is not a .py file (use `train.py ...` or `-m module ...`)"
        )
    return argv


def program_argv(command: Sequence[str], *, python: str) -> list[str]:
    """A non-ddp stage's argv: as written, but `python`/`python3` is `python` (the stage's
    interpreter: the venv's here, the image's in a container) and `x.py ...` runs with it."""
    argv = list(command)
    if argv and argv[0] in _PYTHONS:
        return [python, *argv[1:]]
    return [python, *argv] if argv and argv[0].endswith(".py") else argv


def nproc(spec: JobSpec, *, gpus_visible: int | None = None) -> int:
    """Ranks per node: one per requested GPU; on a CPU-only request one per requested CPU; 1 for a
    non-ddp stage. gpus_visible: what this machine has (local runs); None when the backend's
    resource request (docker --gpus, Slurm gres, Kubernetes limits) grants the count asked for.

    Raises BackendError before anything starts when the machine has fewer GPUs than asked.
    """
    if spec.distributed != "ddp":
        return 1
    want = spec.gpus.count
    if want > 0:
        if gpus_visible is not None and want > gpus_visible:
            have = f"{gpus_visible} GPU" + ("" if gpus_visible == 1 else "s")
            raise BackendError(
                f"stage '{spec.stage}' asks for {want} GPUs per node but this machine has {have}; "
                f"pass --gpus {gpus_visible} (0 runs on CPU) or run it --on slurm/kubernetes"
            )
        return want
    return max(1, spec.cpus or 1)


def omp_threads(spec: JobSpec, *, nproc: int, cpu_count: int) -> int:
    """Intra-op threads per rank: the job's CPUs shared evenly, at least 1 (no oversubscription)."""
    cpus = spec.cpus or cpu_count
    return max(1, cpus // max(1, nproc))


def torchrun_command(
    spec: JobSpec,
    *,
    nproc_per_node: int,
    rdzv_endpoint: str | None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    rdzv_id: str | None = None,
    log_dir: str | None = None,
    python: str = "python",
) -> list[str]:
    """The full torchrun argv for a ddp stage: `python -m torchcapsule.launch.torchrun ...`.

    rdzv_endpoint: "host:port" of the c10d rendezvous (the caller picks a free port at launch;
    never a fixed 29500 that collides with another job). None: an operator (Kubeflow) sets the
    rendezvous and node count through PET_* variables and restarts failed pods itself.
    nnodes defaults to spec.nodes. node_rank is only for static launchers that know it (c10d
    assigns ranks itself). log_dir: where torchrun keeps per-rank stdout/stderr (--tee 3 also
    streams them to the console with a `[rankN]:` prefix, N being the local rank).
    python: the interpreter where the job runs (e.g. sys.executable locally; the image's `python`).
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    n = spec.nodes if nnodes is None else nnodes
    opts = {"--nnodes": n, "--nproc_per_node": nproc_per_node, "--rdzv_backend": "c10d",
            "--rdzv_endpoint": rdzv_endpoint, "--rdzv_id": rdzv_id or spec.name,
            "--max_restarts": spec.retries,
            # `--role rank` makes torchrun's console prefix read "[rank0]:" instead of "[default0]:".
            "--role": "rank", "--tee": 3, "--node_rank": node_rank, "--log_dir": log_dir}
    if rdzv_endpoint is None:
        opts = {"--nproc_per_node": nproc_per_node, "--role": "rank", "--tee": 3}
    argv = [python, "-m", TORCHRUN]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv + entrypoint(spec.command, stage=spec.stage)


def stage_command(
    spec: JobSpec,
    *,
    python: str = "python",
    rdzv_endpoint: str | None = LOCAL_RDZV,
    rdzv_id: str | None = None,
    log_dir: str | None = None,
    gpus_visible: int | None = None,
    mounts: Mapping[str, str] | None = None,
    cpu_count: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a stage on a backend: every backend's one way from a stage to its process.

    python: the stage's interpreter where the job runs (it also starts torchrun for a ddp stage);
    rdzv_endpoint/rdzv_id/log_dir: see torchrun_command; gpus_visible: see nproc; mounts and
    cpu_count: see stage_env.
    """
    n = nproc(spec, gpus_visible=gpus_visible)
    env = stage_env(spec, mounts=mounts, nproc=n, cpu_count=cpu_count)
    if spec.distributed != "ddp":
        return program_argv(spec.command, python=python), env
    return torchrun_command(spec, nproc_per_node=n, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                            log_dir=log_dir, python=python), env


def capsule_env(spec: JobSpec, *, mounts: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every stage gets: where the volumes are, and which project/stage it is.

    mounts: volume name -> path as the job sees it (the docker backend passes CONTAINER_MOUNTS);
    default: the host paths of spec.volumes. The stage's own `env:` wins over nothing here
    except that it is applied last by `stage_env`.
    """
    paths = dict(mounts) if mounts is not None else {k: str(v) for k, v in spec.volumes.items()}
    env = {"CAPSULE_PROJECT": spec.project, "CAPSULE_STAGE": spec.stage}
    for vol in ("data", "models", "logs", "workspace"):
        if vol in paths:
            env[f"CAPSULE_{vol.upper()}_DIR"] = str(paths[vol])
    if mounts is not None:  # in the project image: lineage records which (registry.facts.running_image)
        env["CAPSULE_IMAGE"] = spec.image
    env.update(_tracking_env(spec, mounts))
    return env


def _tracking_env(spec: JobSpec, mounts: Mapping[str, str] | None) -> dict[str, str]:
    """spec.tracking as the job sees it: an embedded SQLite store inside a mounted volume gets its
    mounted path; one outside every volume cannot be reached from the job, so the job tracks
    nothing live and its JSONL is synced from the host afterwards (a server URL passes as is)."""
    env = dict(spec.tracking)
    uri = env.get("CAPSULE_TRACKING_URI", "")
    if mounts is None or not uri.startswith("sqlite:///"):
        return env
    db = Path(uri[len("sqlite:///"):])
    for vol, host in spec.volumes.items():
        try:
            rel = db.relative_to(Path(host).resolve())
        except ValueError:
            continue
        if vol in mounts:
            env["CAPSULE_TRACKING_URI"] = f"sqlite:///{Path(mounts[vol]) / rel}"
            return env
    env.pop("CAPSULE_TRACKING_URI")
    return env


def stage_env(
    spec: JobSpec,
    *,
    mounts: Mapping[str, str] | None = None,
    nproc: int = 1,
    cpu_count: int | None = None,
) -> dict[str, str]:
    """capsule_env + thread settings + the stage's `env:` (the stage's values win)."""
    env = capsule_env(spec, mounts=mounts)
    threads = str(omp_threads(spec, nproc=nproc, cpu_count=cpu_count or os.cpu_count() or 1))
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    # Unbuffered output: ranks' lines reach the log as they are printed, not at exit.
    env["PYTHONUNBUFFERED"] = "1"
    if spec.distributed == "ddp":
        # torchrun shares its rendezvous TCPStore with the ranks by default; after a restart the
        # new ranks then read the previous attempt's gloo/NCCL addresses and fail to connect
        # (pytorch/pytorch#135712, seen here with torch 2.13 + gloo). A store per attempt fixes it.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(spec.env)
    return env


def shell_join(argv: Sequence[str]) -> str:
    """shlex.join, except that words holding "$" stay expandable (double-quoted)."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)
