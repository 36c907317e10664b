"""capsule.yaml: the typed schema and loading with path-named, one-line errors.

Parse once at the edge into an immutable `Project`; everything inward takes typed objects.
Errors read `capsule.yaml:12: stages.train.resources.gpus: <problem>; <what is allowed>`.
"""
from __future__ import annotations

import difflib
import re
import reprlib
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import CompatError, ConfigError

PROJECT_FILE = "capsule.yaml"
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Values echoed in errors are cut short: a value built from YAML aliases can be megabytes.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 4, 60, 60
MAX_ECHO = 120


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 3] + "..."


# Anything pasted into a generated file (sbatch script, DAG, manifest) must stay on its line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class FieldError(ValueError):
    """A validator's error about another field than the one it checks, or about a whole model:
    `loc` is the path from the top of capsule.yaml (pydantic's own loc would be the model's)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc, self.message = loc, message

    @classmethod
    def of(cls, e: ConfigError) -> "FieldError":
        """compat's and rules' errors name their field (ConfigError.at)."""
        return cls(tuple(e.where.split(".")), e.problem) if e.where else cls((), e.message)


def _one_line(v: Any) -> Any:
    if isinstance(v, str) and _CONTROL.search(v):
        raise ValueError(f"{_short(v)} holds a newline or control character; write it on one line")
    return v


# -- sizes and GPUs ----------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: str | int) -> int:
    """'8Gi' -> 8589934592, '2g' -> 2000000000, 1024 -> 1024 (bytes)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"{_short(value)} is not a size; use a number with a unit such as 512Mi, 8Gi or 2g")
    num, unit = m.groups()
    return int(float(num) * _UNITS[(unit or "").lower()])


class GpuRequest(_Model):
    """`gpus: 2` or `gpus: "H100:4"`: a count and an optional GPU type."""

    count: int = 0
    type: str | None = None

    def __str__(self) -> str:
        return f"{self.type}:{self.count}" if self.type else str(self.count)


MAX_GPUS_PER_NODE = 1024  # far above any machine; stops 99999999999999999999 reaching a scheduler


def _gpu_count(count: int, value: Any) -> int:
    if count > MAX_GPUS_PER_NODE:
        raise ValueError(f"{_short(value)} asks for more than {MAX_GPUS_PER_NODE} GPUs per node; "
                         "use the GPUs of one node and resources.nodes for more")
    return count


def parse_gpus(value: Any) -> GpuRequest:
    if isinstance(value, GpuRequest):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a GPU count such as 2 or a typed request such as H100:4, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} GPUs is negative; use 0 or more, or TYPE:N such as H100:4")
        return GpuRequest(count=_gpu_count(value, value))
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return GpuRequest(count=_gpu_count(int(text), value))
        if ":" in text:
            gtype, _, count = text.partition(":")
            if not count.strip().isdigit() or int(count) < 1:
                raise ValueError(f"{_short(value)}: the count after ':' must be a whole number >= 1, e.g. H100:4")
            _gpu_count(int(count), value)
            from .compat import load_matrix

            matrix = load_matrix()
            model = matrix.gpu(gtype)
            if model is None:
                close = difflib.get_close_matches(gtype.upper(), list(matrix.gpus), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"unknown GPU type {_short(gtype)}{hint}; known: {', '.join(matrix.gpus)}")
            return GpuRequest(count=int(count), type=model.name)
    raise ValueError(f"{_short(value)} is not a GPU request; use a count such as 2 or TYPE:N such as H100:4")


# -- durations -------------------------------------------------------------------------------
_UNIT_TIME = re.compile(r"(?:(\d{1,9})d)?(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?")
_SLURM_TIME = re.compile(r"(?:(\d{1,9})-)?(\d{1,9})(?::(\d{1,9}))?(?::(\d{1,9}))?")
MAX_DURATION = timedelta(days=365)  # far above any job; stops 10**20 minutes overflowing timedelta
DURATION_FORMS = "use 90m, 2h, 1h30m, 1d, or Slurm's minutes (90), MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS"


def parse_duration(value: Any) -> timedelta:
    """A wall-clock limit: Slurm's --time forms (a bare number is minutes) or 2h, 90m, 1h30m, 1d."""
    if isinstance(value, timedelta):
        return value
    text = value.strip().lower() if isinstance(value, str) else str(value) if type(value) is int else ""
    unit, slurm = _UNIT_TIME.fullmatch(text), _SLURM_TIME.fullmatch(text)
    if unit and any(unit.groups()):
        d, h, m, s = (int(x or 0) for x in unit.groups())
    elif slurm:
        days, *fields = slurm.groups()
        nums = [int(x) for x in fields if x is not None]
        if any(x >= 60 for x in nums[1:]) or days and nums[0] >= 24:
            raise ValueError(f"{_short(value)} is not a duration: minutes and seconds after the first field "
                             f"run 0-59, hours after 'D-' 0-23; {DURATION_FORMS}")
        # with a day: D-H[:M[:S]]; without: M, M:S or H:M:S
        d, (h, m, s) = int(days or 0), (nums + [0, 0])[:3] if days or len(nums) == 3 else [0, *nums, 0][:3]
    else:
        raise ValueError(f"{_short(value)} is not a duration; {DURATION_FORMS}")
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    if not 0 < seconds <= MAX_DURATION.total_seconds():
        raise ValueError(f"{_short(value)} is {'no time' if seconds == 0 else 'over a year'}; "
                         "use a limit from 1s to 365d, or leave the key out for no limit")
    return timedelta(seconds=seconds)


def duration_text(limit: timedelta) -> str:
    """Slurm's --time form, also how capsule.yaml's durations are written out: HH:MM:SS or D-HH:MM:SS."""
    d, s = divmod(int(limit.total_seconds()), 86400)
    hms = f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{d}-{hms}" if d else hms


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(duration_text, when_used="json")]


# -- image ------------------------------------------------------------------------------------
class User(_Model):
    name: str = Field("mluser", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    uid: int = Field(1000, ge=1, le=65534)
    gid: int | None = Field(None, ge=1, le=65534)


class Image(_Model):
    torch: str = "2.13.0"
    cuda: str = "cpu"
    python: str = "3.11"
    flavor: Literal["jupyter-ssh", "slim"] = "jupyter-ssh"
    base: str | None = None
    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    user: User = User()
    registry: str | None = None  # image repository prefix, e.g. ghcr.io/acme
    # gcc/g++ + Python headers for torch.compile (Inductor, Triton); None: jupyter-ssh and CUDA
    # images have them, CPU slim images do not (image/spec.py: BuildSpec.needs_compiler)
    compilers: bool | None = None

    @field_validator("torch", "python", "cuda", mode="before")
    @classmethod
    def _as_text(cls, v: Any) -> Any:
        # YAML reads 3.10 as the float 3.1: refuse floats rather than guess.
        if isinstance(v, float):
            raise ValueError(
                f"{v} was read as a number (YAML turns 3.10 into 3.1); quote versions, e.g. \"3.10\""
            )
        return str(v) if isinstance(v, int) else v

    @field_validator("cuda")
    @classmethod
    def _cuda(cls, v: str) -> str:
        from .compat import normalize_cuda

        return normalize_cuda(v)

    @model_validator(mode="after")
    def _compatible(self) -> "Image":
        from .compat import load_matrix

        try:
            load_matrix().check(self.torch, self.cuda, self.python)
            for req in self.pip:
                # an exact torchvision/torchaudio pin must be the one built for image.torch
                m = re.match(r"^\s*(torchvision|torchaudio)\s*==\s*([0-9][0-9.]*)", req)
                if m:
                    load_matrix().check_companion(self.torch, m.group(1), m.group(2), where="image.pip")
        except CompatError as e:
            raise FieldError.of(e) from None
        return self


class Volumes(_Model):
    workspace: str = "."
    data: str = "./data"
    models: str = "./models"
    logs: str = "./logs"
    # A volume on `/` or a system directory, or a stage workdir outside the project, is refused
    # unless this is set: containers mount volumes read-write.
    allow_system_paths: bool = False

    @field_validator("workspace", "data", "models", "logs")
    @classmethod
    def _path(cls, v: str) -> str:
        return _one_line(v)


VOLUME_NAMES = ("workspace", "data", "models", "logs")
# Host directories no volume may be (or, for the first group, lie under) without opt-in.
_SYSTEM_TREES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib64")
_SYSTEM_DIRS = ("/", "/var", "/root", "/home", "/run")


def system_path(path: Path) -> bool:
    """True for `/`, a top-level system directory, or anything under /etc, /proc, /usr..."""
    p = path.as_posix()
    return p in _SYSTEM_DIRS or any(p == t or p.startswith(t + "/") for t in _SYSTEM_TREES)


# -- stages -----------------------------------------------------------------------------------
class Resources(_Model):
    gpus: GpuRequest = GpuRequest()
    nodes: int = Field(1, ge=1, le=4096)
    cpus: int | None = Field(None, ge=1)
    memory: str | None = None
    shm_size: str | None = None
    time: Duration | None = None  # wall-clock limit (Slurm --time, Kubernetes activeDeadlineSeconds)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> GpuRequest:
        return parse_gpus(v)

    @field_validator("memory", "shm_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is None:
            return v
        parse_size(v)  # raises with the allowed forms
        return str(v)

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory) if self.memory else None

    @property
    def shm_bytes(self) -> int | None:
        return parse_size(self.shm_size) if self.shm_size else None


class Stage(_Model):
    run: str = Field(min_length=1)
    needs: tuple[str, ...] = ()
    resources: Resources = Resources()
    distributed: Literal["none", "ddp"] = "none"
    env: dict[str, str] = {}
    retries: int = Field(0, ge=0, le=100)
    inputs: tuple[str, ...] = ()  # globs whose content decides whether a cached stage reruns
    outputs: tuple[str, ...] = ()
    workdir: str | None = None

    @field_validator("needs", mode="before")
    @classmethod
    def _needs(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for k in v:
                # the key is pasted unquoted (`export KEY=...` in the sbatch script)
                if not ENV_KEY_RE.fullmatch(str(k)):
                    raise ValueError(f"env key {_short(str(k))} is not a variable name; "
                                     "use letters, digits and '_', not starting with a digit")
            return {str(k): str(x) for k, x in v.items()}
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        return _one_line(v)


# -- registry, serve, schedule, targets -------------------------------------------------------
class Promotion(_Model):
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]{1,255}$")
    rule: str | None = None  # e.g. "accuracy >= 0.95 and accuracy >= champion.accuracy"

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        # checked at load time (AST whitelist, never eval) so `capsule validate` names the line
        if v is None:
            return v
        from .registry.rules import parse_rule

        try:
            parse_rule(v)
        except ConfigError as e:
            raise FieldError.of(e) from None
        return v


class Registry(_Model):
    tracking_uri: str | None = None  # default: sqlite under .capsule/
    model_name: str | None = None
    promote: Promotion = Promotion()


class Serve(_Model):
    """The service's settings, defined once: capsule.yaml `serve:` and `capsule serve`'s flags, whose
    types, bounds, defaults and help cli/serve.py builds from these fields (a flag overrides yaml)."""

    model: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory.")
    handler: str | None = Field(None, description="Custom handler FILE.py:Class (else the built-in handler, "
                                "which reads meta.json).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port (0 = any free port).")
    workers: int = Field(1, ge=1, description="Worker processes sharing the port; the flag also takes 'gpu': "
                         "one per visible GPU, each on its own.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Requests per batch.")
    max_wait_ms: float = Field(2.0, ge=0, le=10_000, description="Longest a batch keeps collecting while "
                               "requests keep arriving (ms).")
    max_queue: int = Field(256, ge=1, description="Queued requests before 503.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout in seconds, answered 504.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Larger bodies get 413.")
    reload_interval: float | None = Field(None, ge=0, description="Check the alias/directory for a new version "
                                          "every S seconds (0 = never; unset: 30 for models:/NAME@ALIAS and "
                                          "for symlinks, else 0).")
    threads: int = Field(0, ge=0, description="torch intra-op threads per process (0 = torch's default).")
    forward_thread: bool = Field(False, description="Run forwards in a worker thread instead of the event loop.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")

    @staticmethod
    def flag(name: str) -> str:
        """The `capsule serve` flag of field NAME."""
        return "--timeout" if name == "timeout_s" else "--" + name.replace("_", "-")

    def flags(self) -> list[str]:
        """`capsule serve` arguments that reproduce these settings (MODEL first)."""
        argv = [str(self.model)]
        for name, value in self.model_dump(exclude={"model"}).items():
            if value is not None and value is not False:
                argv += [self.flag(name)] + ([] if value is True else [str(value)])
        return argv


_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_MACROS = {"@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight"}


def check_cron(expr: str) -> str:
    expr = expr.strip()
    if expr in _CRON_MACROS:
        return expr
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"'{expr}' has {len(fields)} fields; a cron expression has 5 "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * 1'"
        )
    names = ["minute", "hour", "day-of-month", "month", "day-of-week"]
    for text, (lo, hi), name in zip(fields, _CRON_RANGES, names):
        if not _CRON_FIELD.match(text):
            raise ValueError(f"'{expr}': the {name} field '{text}' is not a number, range, list, step or '*'")
        for n in re.findall(r"\d+", re.sub(r"/\d+", "", text)):
            if not lo <= int(n) <= hi:
                raise ValueError(f"'{expr}': {name} {n} is out of range {lo}-{hi}")
    return expr


class Schedule(_Model):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return check_timezone(v)


def check_timezone(name: str) -> str:
    """An IANA zone name the tz database knows (it is pasted into the DAG, CronJob, workflow)."""
    import zoneinfo

    try:
        if not re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", name):
            raise ValueError
        zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"{_short(name)} is not a time zone of the tz database; {hint}"
                         "use a name such as UTC or Europe/Berlin") from None
    return name


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class DockerTarget(_Model):
    network: str | None = None  # e.g. "host"
    ipc_host: bool = True
    extra_args: tuple[str, ...] = ()


class SlurmContainer(_Model):
    runtime: Literal["pyxis", "apptainer"]
    image: str | None = None  # default: the project image


class SlurmTarget(_Model):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: Duration | None = None
    constraint: str | None = None
    container: SlurmContainer | None = None
    extra_directives: tuple[str, ...] = ()
    # Interpreter whose environment (torchrun, the project's packages) runs the stage when no
    # container runtime is set; must exist on the compute nodes. Default: the submitting one.
    python: str | None = None

    @field_validator("partition", "account", "qos", "constraint", "python")
    @classmethod
    def _directive(cls, v: str | None) -> str | None:
        return _one_line(v)  # each becomes one `#SBATCH --key=value` line

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for x in v:
            _one_line(x)
        return v


class KubernetesTarget(_Model):
    namespace: str = "default"
    context: str | None = None
    operator: Literal["none", "kubeflow"] = "none"
    node_selector: dict[str, str] = {}
    tolerations: tuple[Toleration, ...] = ()
    affinity: dict[str, Any] | None = None
    pvc: dict[str, str] = {}  # volume name (workspace/data/models/logs) -> PVC claim name
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None


class Targets(_Model):
    docker: DockerTarget = DockerTarget()
    slurm: SlurmTarget = SlurmTarget()
    kubernetes: KubernetesTarget = KubernetesTarget()


# -- the project ------------------------------------------------------------------------------
class Project(_Model):
    name: str = Field(pattern=NAME_RE)
    image: Image = Image()
    volumes: Volumes = Volumes()
    stages: dict[str, Stage] = {}
    registry: Registry = Registry()
    serve: Serve = Serve()
    schedule: Schedule | None = None
    targets: Targets = Targets()
    # Where the file was read from; not part of the YAML.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, Stage]) -> dict[str, Stage]:
        for name in v:
            if not STAGE_NAME_RE.fullmatch(name):  # fullmatch: `$` would let "evil\n" through
                raise ValueError(f"stage name {_short(name)} may hold only letters, digits, '-' and '_'")
        return v

    @model_validator(mode="after")
    def _needs_known(self) -> "Project":
        for name, stage in self.stages.items():
            for need in stage.needs:
                if need not in self.stages:
                    close = difflib.get_close_matches(need, list(self.stages), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise FieldError(("stages", name, "needs"), f"unknown stage '{need}'{hint}; "
                                     f"stages: {', '.join(self.stages)}")
        # A cycle in `needs` is caught here too, so `capsule validate` reports it with its line.
        from .pipeline.dag import find_cycle

        cycle = find_cycle({n: s.needs for n, s in self.stages.items()})
        if cycle:
            a, b = cycle[-2], cycle[-1]
            raise FieldError(("stages", b, "needs"), f"cycle {' -> '.join(cycle)}; remove '{a}' from "
                             f"stages.{b}.needs (or another need on the cycle)")
        self._paths_contained()
        return self

    def _paths_contained(self) -> None:
        """Volumes on `/` or system directories, and workdirs leaving the project: opt-in only."""
        if self.volumes.allow_system_paths:
            return
        optin = "set volumes.allow_system_paths: true if you mean it"
        for name in VOLUME_NAMES:
            host = self.volume_path(name)
            if system_path(host):
                raise FieldError(("volumes", name), f"{_short(getattr(self.volumes, name))} is {host}, a system "
                                 f"directory that containers would mount read-write; use a project or data "
                                 f"directory, or {optin}")
        root = self.root.resolve()
        for sname, stage in self.stages.items():
            if stage.workdir is None:
                continue
            wd = (self.root / Path(stage.workdir).expanduser()).resolve()
            if wd != root and root not in wd.parents:
                raise FieldError(("stages", sname, "workdir"), f"{_short(stage.workdir)} is {wd}, outside "
                                 f"the project {root}; use a directory inside it, or {optin}")

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            close = difflib.get_close_matches(name, list(self.stages), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"no stage '{name}' in {self.root / PROJECT_FILE}{hint}; stages: {', '.join(self.stages) or 'none'}"
            )
        return self.stages[name]

    def volume_path(self, name: str) -> Path:
        """Absolute host path of a volume (workspace, data, models, logs)."""
        p = Path(getattr(self.volumes, name)).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()


# -- loading ----------------------------------------------------------------------------------
def find_project_file(path: str | Path | None = None) -> Path:
    """A file path as given, or capsule.yaml in the directory (or its parents)."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / PROJECT_FILE
        if not p.is_file():
            raise ConfigError(f"{p}: no such file; pass the path of a capsule.yaml or run `capsule init DIR`")
        return p
    here = Path.cwd()
    for d in (here, *here.parents):
        if (d / PROJECT_FILE).is_file():
            return d / PROJECT_FILE
    raise ConfigError(f"no {PROJECT_FILE} in {here} or its parents; pass --file PATH or run `capsule init DIR`")


def load_project(path: str | Path | None = None) -> Project:
    file = find_project_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                          "capsule.yaml must be a YAML text file") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read it ({e.strerror})") from None
    return parse_project(text, file)


# How many values a capsule.yaml may hold once its aliases are expanded. Real files hold a few
# hundred; an alias bomb (each level repeating the previous one 9 times) passes millions.
MAX_YAML_NODES = 50_000


def expanded_size(root: Any) -> int:
    """Number of nodes of a composed YAML graph with every alias expanded, without expanding it
    (aliases share node objects: sizes are memoised per node, iteratively, no recursion)."""
    import yaml

    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids = ([x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            size[id(node)] = min(1 + sum(size.get(id(k), 0) for k in kids), MAX_YAML_NODES + 1)
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
    return size.get(id(root), 0)


@cache
def _loader() -> type:
    """PyYAML's safe loader, except that YAML 1.1's base-60 numbers stay text: `time: 12:00:00` is
    twelve hours, not the integer 43200 (minutes, for a duration), as YAML 1.2 reads it too."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    base60 = ("tag:yaml.org,2002:str", re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$"))
    resolvers = {k: [base60, *v] if k in tuple("+-0123456789") else v
                 for k, v in base.yaml_implicit_resolvers.items()}
    return type("CapsuleLoader", (base,), {"yaml_implicit_resolvers": resolvers})


def parse_project(text: str, file: Path | str = PROJECT_FILE) -> Project:
    import yaml

    file = Path(file)
    loader = _loader()
    try:
        node = yaml.compose(text, Loader=loader)
        if node is not None and expanded_size(node) > MAX_YAML_NODES:
            raise ConfigError(f"{file}: its aliases (*name) expand to more than {MAX_YAML_NODES} values; "
                              "refused (an alias bomb?); write the values out or use fewer aliases")
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}{line}: not valid YAML: {_short(problem)}; fix the syntax at that line") from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to read; flatten it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping with at least 'name:', got {type(data).__name__}")
    try:
        project = Project.model_validate({**data, "root": file.resolve().parent})
    except ValidationError as e:
        raise ConfigError(_format_error(e, file, text)) from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to check; flatten it") from None
    return project


def _format_error(err: ValidationError, file: Path, text: str) -> str:
    """The first error as one line: file:line: field.path: problem; allowed values."""
    e = err.errors()[0]
    named = e.get("ctx", {}).get("error")
    if isinstance(named, FieldError):
        loc, msg = list(named.loc), named.message
    else:
        loc, msg = [str(p) for p in e["loc"]], e["msg"].removeprefix("Value error, ")
    kind = e["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        msg = f"unknown key '{key}'; {hint}allowed: {', '.join(allowed)}"
    elif kind == "literal_error":
        msg = f"{msg.replace('Input should be', 'must be')} (got {_short(e['input'])})"
    elif kind == "missing":
        msg = "is required"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"{msg} (got {_short(e['input'])})"
    if len(msg) > 4 * MAX_ECHO:  # a message that quotes its value in full
        msg = msg[:4 * MAX_ECHO - 3] + "..."
    line = _line_of(text, loc)
    where = f"{file}:{line}" if line else str(file)
    return f"{where}: {'.'.join(_short(p)[1:-1] if len(p) > MAX_ECHO else p for p in loc)}: {msg}"


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the model at `loc` (for did-you-mean on unknown keys)."""
    model: Any = Project
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            break
        if part in fields:
            ann = fields[part].annotation
            model = _model_of(ann)
        else:  # a dict key (a stage name): step into the dict's value model
            continue
    fields = getattr(model, "model_fields", {})
    return [n for n, f in fields.items() if not f.exclude]


def _model_of(ann: Any) -> Any:
    from typing import get_args

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in get_args(ann):
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _line_of(text: str, loc: list[str]) -> int | None:
    """1-based line of the YAML node at `loc` (the deepest one that exists)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=_loader())
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if str(k.value) == part:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


__all__ = [
    "Project", "Image", "User", "Volumes", "Stage", "Resources", "GpuRequest", "Registry",
    "Promotion", "Serve", "Schedule", "Targets", "DockerTarget", "SlurmTarget", "SlurmContainer",
    "KubernetesTarget", "Toleration", "load_project", "parse_project", "find_project_file",
    "parse_size", "parse_gpus", "parse_duration", "duration_text", "check_cron", "check_timezone",
    "PROJECT_FILE",
]
