"""The process a stage runs as, inside whatever the backend provides (pure).

A `distributed: ddp` stage runs under torchrun (one launcher per node, N ranks per node);
any other stage runs its command as written. Backends only choose the rendezvous.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from .api import JobSpec

PYTHONS = ("python", "python3")
DEFAULT_PORT = 29500


def nproc_per_node(spec: JobSpec) -> int:
    """Ranks per node: one per GPU; on CPU one per requested CPU (the example's 2 ranks)."""
    if spec.distributed != "ddp":
        return 1
    if spec.gpus.count:
        return spec.gpus.count
    return max(1, spec.cpus or 1)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a multi-node job meet. `endpoint` may be a shell expression."""

    endpoint: str  # "HOST:PORT", e.g. "$head:$port" in an sbatch script
    job_id: str


def stage_argv(spec: JobSpec, *, nnodes: int = 1, rdzv: Rendezvous | None = None,
               python: str = "python", torchrun: str = "torchrun") -> list[str]:
    cmd = list(spec.command)
    if spec.distributed != "ddp":
        return [python, *cmd] if cmd[0].endswith(".py") else cmd
    argv = [torchrun, f"--nproc-per-node={nproc_per_node(spec)}", f"--nnodes={nnodes}"]
    if rdzv is None:
        argv.append("--standalone")  # one node: torchrun picks a free local port itself
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv.endpoint}", f"--rdzv-id={rdzv.job_id}"]
    if spec.retries:
        # Restart the ranks from their last checkpoint on failure, inside the same allocation.
        argv.append(f"--max-restarts={spec.retries}")
    return argv + torchrun_target(spec)


def torchrun_target(spec: JobSpec) -> list[str]:
    """What follows torchrun's own options: a script, `-m module`, or --no-python and a program."""
    cmd = list(spec.command)
    if cmd[0] in PYTHONS or cmd[0].endswith("/python") or cmd[0].endswith("/python3"):
        return cmd[1:]  # torchrun is itself the Python launcher ("-m mod" passes through)
    if cmd[0].endswith(".py"):
        return cmd
    return ["--no-python", *cmd]


def shell_join(argv: list[str]) -> str:
    """shlex.join, except that words holding "$" stay expandable (double-quoted)."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)


def container_env(spec: JobSpec, mounts: dict[str, str]) -> dict[str, str]:
    """Env every stage gets: where its volumes are, as seen by the process."""
    return {
        "CAPSULE_PROJECT": spec.project,
        "CAPSULE_STAGE": spec.stage,
        **{f"CAPSULE_{k.upper()}_DIR": v for k, v in mounts.items()},
        **spec.env,
    }
