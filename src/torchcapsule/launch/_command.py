"""The process a stage runs as inside what a backend provides (pure); shared by docker,
slurm and kubernetes on top of launch/torchrun.py (the torchrun argv/env contract).

A `distributed: ddp` stage runs under torchrun (one launcher per node); any other stage runs
its command as written (`train.py ...` gets the interpreter in front).
"""
from __future__ import annotations

import shlex
from typing import Sequence

from .api import JobSpec
from .torchrun import entrypoint, failed_rank, nproc_per_node, shell_exit_code, torchrun_command

RDZV_PORT = 29500  # Kubernetes only: the headless Service needs a port known in advance
LOCAL_RDZV = "localhost:0"  # one node: c10d binds a free port itself (what --standalone does)


def nproc(spec: JobSpec) -> int:
    """Ranks per node; the GPU count was checked against the target before (or is the cluster's)."""
    return nproc_per_node(spec, gpus_visible=spec.gpus.count) if spec.distributed == "ddp" else 1


def stage_argv(spec: JobSpec, *, rdzv_endpoint: str = LOCAL_RDZV, rdzv_id: str | None = None,
               launcher: Sequence[str] = ("torchrun",), python: str = "python") -> list[str]:
    if spec.distributed != "ddp":
        cmd = list(spec.command)
        return [python, *cmd] if cmd[0].endswith(".py") else cmd
    return torchrun_command(spec, nproc_per_node=nproc(spec), rdzv_endpoint=rdzv_endpoint,
                            rdzv_id=rdzv_id, launcher=launcher)


def kubeflow_argv(spec: JobSpec) -> list[str]:
    """Under the Kubeflow operator, which sets PET_NNODES/PET_NODE_RANK/PET_MASTER_* itself."""
    return ["torchrun", "--nproc_per_node", str(nproc(spec)), "--role", "rank", "--tee", "3",
            *entrypoint(spec.command, stage=spec.stage)]


def shell_join(argv: Sequence[str]) -> str:
    """shlex.join, except that words holding "$" stay expandable (double-quoted)."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)


def explain_failure(code: int | None, log: str) -> tuple[int | None, str | None]:
    """torchrun reduces a rank's exit code to 1: recover the rank's own code from its summary."""
    found = failed_rank(log) if log else None
    if found is None:
        return code, None
    rank, rank_code, host = found
    real = shell_exit_code(rank_code)
    return real, f"rank {rank}{f' on {host}' if host else ''} exited with {real}"
