"""Launching stages: one JobSpec, one Backend interface, one module per backend.

The name -> backend registry is lazy: `get_backend("slurm")` imports only launch.slurm.
"""
from __future__ import annotations

import importlib

from ..errors import BackendError
from .api import Backend, DryRun, JobSpec, JobState, JobStatus

BACKENDS: dict[str, str] = {
    "local": "torchcapsule.launch.local:LocalBackend",
    "docker": "torchcapsule.launch.docker:DockerBackend",
    "slurm": "torchcapsule.launch.slurm:SlurmBackend",
    "kubernetes": "torchcapsule.launch.kubernetes:KubernetesBackend",
}


def get_backend(name: str, **options) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise BackendError(f"--on: unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**options)


def backend_of(job_id: str) -> tuple[str, str]:
    """'slurm:1234' -> ('slurm', '1234'); job ids always carry their backend."""
    name, sep, native = job_id.partition(":")
    if not sep or name not in BACKENDS or not native:
        raise BackendError(
            f"job id '{job_id}' is not of the form BACKEND:ID (e.g. slurm:42); see `capsule jobs list`"
        )
    return name, native


__all__ = ["BACKENDS", "Backend", "DryRun", "JobSpec", "JobState", "JobStatus", "backend_of", "get_backend"]
