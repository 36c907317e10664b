"""The torchrun command line and environment for a stage (pure: no processes, no probing).

Shared by every backend that starts torchrun: local runs it directly, docker runs it inside
the container, slurm puts it in the batch script (one torchrun per node via srun). The caller
decides the effects (which port is free, how many GPUs the machine has); this module turns
those facts plus a JobSpec into argv and env.

    torchrun_command(spec, nproc_per_node=2, rdzv_endpoint="127.0.0.1:41234")
    -> ["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "127.0.0.1:41234", "--rdzv_id", "digits-train", "--max_restarts", "2",
        ..., "train.py", "--epochs", "30"]
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Mapping, Sequence

from ..errors import BackendError, ConfigError
from .api import JobSpec

# Interpreter names a stage's `run` may start with ("python train.py" == "train.py").
_PYTHONS = ("python", "python3") + tuple(f"python3.{m}" for m in range(8, 20))
# Exit code of a rank that saved a checkpoint on SIGTERM (torchcapsule.train.signals): the
# job was preempted, not broken; a requeued run resumes from the checkpoint. 75 = EX_TEMPFAIL.
PREEMPTED_EXIT_CODE = 75


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


def nproc_per_node(spec: JobSpec, *, gpus_visible: int) -> int:
    """Processes per node: one per requested GPU; on a CPU-only request one per requested CPU.

    Raises BackendError before anything starts when the machine has fewer GPUs than asked.
    """
    want = spec.gpus.count
    if want > 0:
        if want > gpus_visible:
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
    rdzv_endpoint: str,
    nnodes: int | None = None,
    node_rank: int | None = None,
    rdzv_id: str | None = None,
    log_dir: str | None = None,
    launcher: Sequence[str] = ("torchrun",),
) -> list[str]:
    """The full torchrun argv for a ddp stage.

    rdzv_endpoint: "host:port" of the c10d rendezvous (the caller picks a free port at launch;
    never a fixed 29500 that collides with another job). nnodes defaults to spec.nodes.
    node_rank is only for static launchers that know it (c10d assigns ranks itself).
    log_dir: where torchrun keeps per-rank stdout/stderr (--tee 3 also streams them to the
    console with a `[rankN]:` prefix, N being the local rank).
    launcher: e.g. (sys.executable, "-m", "torch.distributed.run") to pin the interpreter.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    n = spec.nodes if nnodes is None else nnodes
    argv = [
        *launcher,
        "--nnodes", str(n),
        "--nproc_per_node", str(nproc_per_node),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rdzv_endpoint,
        "--rdzv_id", rdzv_id or spec.name,
        "--max_restarts", str(spec.retries),
        # `--role rank` makes torchrun's console prefix read "[rank0]:" instead of "[default0]:".
        "--role", "rank",
        "--tee", "3",
    ]
    if node_rank is not None:
        argv += ["--node_rank", str(node_rank)]
    if log_dir is not None:
        argv += ["--log_dir", log_dir]
    return argv + entrypoint(spec.command, stage=spec.stage)


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


def failed_rank(torchrun_output: str) -> tuple[int, int, str | None] | None:
    """(rank, exitcode, host) of the root-cause failure in torchrun's error summary, if it printed one.

    torchrun exits 1 whatever the rank's code was; this recovers the real code:
        rank      : 1 (local_rank: 1)
        exitcode  : 3 (pid: 7511)
    A rank killed by a signal shows a negative exitcode (-9).
    """
    import re

    # Several nodes: one summary per node, lines prefixed by srun --label ("1: "). The root cause
    # is a rank that exited by itself, not one killed (negative code) when the job was torn down.
    found = None
    for text in torchrun_output.split("Root Cause")[1:] or [torchrun_output]:
        m_rank = re.search(r"^(?:\d+: )?\s*rank\s*:\s*(\d+)", text, re.M)
        m_code = re.search(r"^(?:\d+: )?\s*exitcode\s*:\s*(-?\d+)", text, re.M)
        m_host = re.search(r"^(?:\d+: )?\s*host\s*:\s*(\S+)", text, re.M)
        if m_rank and m_code:
            here = int(m_rank.group(1)), int(m_code.group(1)), m_host.group(1) if m_host else None
            if found is None or (found[1] < 0 <= here[1]):
                found = here
    return found


def shell_exit_code(code: int) -> int:
    """A process's exit code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - code if code < 0 else code


__all__ = [
    "PREEMPTED_EXIT_CODE", "capsule_env", "entrypoint", "failed_rank", "nproc_per_node",
    "omp_threads", "shell_exit_code", "stage_env", "torchrun_command",
]
