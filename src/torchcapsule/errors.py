"""One exception tree for torchcapsule.

    CapsuleError                 any error meant for the user: one line, what/where/fix
    ├── ConfigError              capsule.yaml or a flag is invalid (names file:field or --flag)
    │   └── CompatError          a torch/CUDA/Python/driver/GPU combination does not exist
    ├── BackendError             a launch backend is missing, unreachable or refused a job
    │   └── JobNotFound          a job id that no backend knows
    ├── ImageError               rendering, locking, linting or building the image failed
    ├── RegistryError            the model registry refused or cannot be reached
    │   └── IntegrityError       a weight file does not match its recorded checksum
    ├── ServeError               the inference service cannot start
    ├── CheckpointError          a checkpoint directory is full or unwritable
    │   └── CheckpointBusy       another run holds the checkpoint directory's lock
    └── PipelineError            the stage graph is invalid or a stage failed
        └── PipelineInterrupted  Ctrl-C or SIGTERM stopped a pipeline run (exit 130)

The CLI prints `error: <message>` for any CapsuleError and exits with `exit_code`
(2 for usage/config errors, 130 for an interrupted pipeline, 1 otherwise); other exceptions
are bugs and keep their traceback. tests/unit/test_errors.py checks this drawing against the classes.
"""
from __future__ import annotations


class CapsuleError(Exception):
    """An error the user can fix; `str(err)` is the one-line message shown."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class ConfigError(CapsuleError):
    exit_code = 2
    where: str | None = None  # the field or flag it is about ('image.cuda', '--cuda')
    problem: str = ""  # the message without the `where: ` prefix

    @classmethod
    def at(cls, where: str, problem: str, *, hint: str | None = None) -> "ConfigError":
        """An error about one field or flag: shown as `where: problem`, and config can place
        it on that field's line without parsing the text."""
        err = cls(f"{where}: {problem}", hint=hint)
        err.where, err.problem = where, problem
        return err


class CompatError(ConfigError):
    pass


class BackendError(CapsuleError):
    pass


class JobNotFound(BackendError):
    pass


class ImageError(CapsuleError):
    pass


class RegistryError(CapsuleError):
    pass


class IntegrityError(RegistryError):
    pass


class ServeError(CapsuleError):
    pass


class CheckpointError(CapsuleError):
    pass


class CheckpointBusy(CheckpointError):
    pass


class PipelineError(CapsuleError):
    pass


class PipelineInterrupted(PipelineError):
    exit_code = 130


__all__ = [
    "CapsuleError",
    "ConfigError",
    "CompatError",
    "BackendError",
    "JobNotFound",
    "ImageError",
    "RegistryError",
    "IntegrityError",
    "ServeError",
    "CheckpointError",
    "CheckpointBusy",
    "PipelineError",
    "PipelineInterrupted",
]


# The last line a failed rank prints (train/dist.py) and the launchers report as the job's reason.
RANK_CAUSE = "torchcapsule: rank {rank} failed: {cause}"


def rank_cause(log: str, rank: int) -> str | None:
    """The cause that rank `rank` printed last in a job log (pure), whatever prefix torchrun
    (`[rank0]:`) or srun (`1: `) put before the line; None when it printed none."""
    marker = RANK_CAUSE.format(rank=rank, cause="")
    at = log.rfind(marker)
    if at < 0:
        return None
    cause = log[at + len(marker):].split("\n", 1)[0].strip()
    return cause or None
