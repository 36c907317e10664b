"""Effects: ask Docker about the base image, prepare the build context, run `docker build`.

The build is hermetic (wheels come from the host wheelhouse) and atomic: Docker writes the
new image's id to a file and only a successful build is tagged, so a failed build never leaves
a half-built image under the final tag.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ImageError
from . import lock as lockmod
from . import render, wheelhouse
from .spec import KNOWN_PYTHONS, BuildSpec
from .wheelhouse import Target

DOCKER_HINT = "install Docker and start its engine (scripts/start-services.sh here), then retry"


def docker_bin() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise ImageError(f"the docker CLI is not installed; {DOCKER_HINT}")
    return exe


def docker(*args: str, timeout: float | None = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([docker_bin(), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        raise ImageError(f"`docker {args[0]}` failed: {err[-1] if err else r.returncode}")
    return r


def require_engine() -> None:
    r = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if r.returncode != 0:
        raise ImageError(f"no Docker engine answers (`docker info` failed: "
                         f"{(r.stderr.strip().splitlines() or ['?'])[-1]}); {DOCKER_HINT}")


def ensure_base(base: str, *, where: str = "--base") -> None:
    """The base is present locally or can be pulled; else one line saying why and what to do."""
    if docker("image", "inspect", base, check=False, timeout=30).returncode == 0:
        return
    r = docker("pull", base, check=False, timeout=600)
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ImageError(f"{where}: base image '{base}' is not here and cannot be pulled ({reason}); "
                         "check the name, `docker login` to its registry, or build it locally "
                         "(scripts/make-base-image.sh makes local/debian:bookworm)")


def base_python(spec: BuildSpec, *, use_docker: bool = True) -> str:
    """The full version of the base image's python3 ('3.11.2'), checked against spec.python."""
    where = "--base" if not spec.base_is_default else f"default base {spec.base}"
    full = None
    if use_docker:
        ensure_base(spec.base, where=where)
        r = docker("run", "--rm", "--network", "host", "--entrypoint", "python3", spec.base, "-c",
                   "import sys; print('%d.%d.%d' % sys.version_info[:3])", check=False, timeout=120)
        if r.returncode == 0:
            full = r.stdout.strip()
        elif spec.base not in KNOWN_PYTHONS:
            raise ImageError(f"{where}: image '{spec.base}' has no python3; use a base with Python {spec.python} "
                             "as python3 (e.g. ubuntu:24.04 for 3.12, debian:bookworm for 3.11)")
    full = full or KNOWN_PYTHONS.get(spec.base)
    if full is None:
        raise ImageError(f"{where}: cannot tell the Python version of '{spec.base}' without a Docker engine; {DOCKER_HINT}")
    if ".".join(full.split(".")[:2]) != spec.python:
        raise ImageError(f"{where}: base image '{spec.base}' has Python {full} but the image asks for Python "
                         f"{spec.python}; pass --base with an image whose python3 is {spec.python} or set --python "
                         f"{'.'.join(full.split('.')[:2])}")
    return full


@dataclass
class BuildResult:
    tag: str
    image_id: str
    size_bytes: int
    seconds: float
    lock_hash: str


def repo_root() -> Path:
    """The torchcapsule source tree (for its own wheel): src/torchcapsule/.. /.."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise ImageError("torchcapsule is not installed from a source checkout, so its wheel cannot be built "
                         "for the image; install it with `pip install -e .` from a clone")
    return root


def prepare_context(spec: BuildSpec, project_root: Path, *, torch_index: str | None,
                    python_full: str, dest: Path | None = None) -> tuple[Path, str]:
    """Build context under .capsule/build/<flavor>/: rendered files, locks, wheels/, capsule-wheel/."""
    target = Target(python_full)
    files, lock_hash = lockmod.locked_files(spec, target, project_root, torch_index=torch_index)
    ctx = dest or project_root / ".capsule" / "build" / spec.flavor
    ctx.mkdir(parents=True, exist_ok=True)
    render.write(render.render(spec), ctx)
    shutil.copy2(project_root / lockmod.LOCK, ctx / lockmod.LOCK)
    if spec.has_dev_tools:
        shutil.copy2(project_root / lockmod.DEV_LOCK, ctx / lockmod.DEV_LOCK)
    wheelhouse.materialize(files, ctx / "wheels")
    wheelhouse.project_wheel(repo_root(), ctx / "capsule-wheel")
    return ctx, lock_hash


_STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def docker_build(ctx: Path, tag: str, labels: dict[str, str], *, dockerfile: str = "Dockerfile",
                 on_line: Callable[[str], None] | None = None, log_path: Path | None = None) -> str:
    """Run the classic/BuildKit builder with host networking; return the image id. Tags only on success."""
    with tempfile.TemporaryDirectory(prefix="capsule-build-") as tmp:
        iid = Path(tmp) / "iid"
        cmd = [docker_bin(), "build", "--force-rm", "--network", "host", "--iidfile", str(iid), "-f", str(ctx / dockerfile)]
        for k, v in labels.items():
            cmd += ["--label", f"{k}={v}"]
        cmd.append(str(ctx))
        tail: deque[str] = deque(maxlen=40)
        step = ""
        log = open(log_path, "w", buffering=1) if log_path else None  # line-buffered: tail -f works
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if log:
                    log.write(line + "\n")
                if _STEP_RE.match(line):
                    step = line
                if on_line:
                    on_line(line)
            rc = proc.wait()
        finally:
            if log:
                log.close()
        if rc != 0 or not iid.is_file():
            raise ImageError(_failure(step, list(tail), log_path, tag))
        image_id = iid.read_text().strip()
    docker("tag", image_id, tag)
    return image_id


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_NOISE_RE = re.compile(r"^(The command '|DEPRECATED:|\s+Install the buildx|\s+https://docs.docker.com|Removing intermediate)")


def _failure(step: str, tail: list[str], log_path: Path | None, tag: str) -> str:
    """One line: the step that failed and the most telling line of its output."""
    lines = [_ANSI_RE.sub("", ln).strip() for ln in tail]
    lines = [ln for ln in lines if ln and not _NOISE_RE.match(ln) and not _STEP_RE.match(ln)]
    reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    if reason is None:
        reason = next((ln for ln in reversed(lines) if re.search(r"(?i)\berror\b|failed|not found", ln)), None)
    reason = (reason or (lines[-1] if lines else "no output"))[:300]
    where = f" at {step.split(' : ')[0]} ({step.split(' : ', 1)[-1][:60]}...)" if step else ""
    see = f"; full log: {log_path}" if log_path else ""
    return f"docker build failed{where}: {reason}; {tag} was not tagged{see}"


def image_size(ref: str) -> int:
    r = docker("image", "inspect", "--format", "{{.Size}}", ref)
    return int(r.stdout.strip())


def image_labels(ref: str) -> dict[str, str]:
    r = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref)
    return json.loads(r.stdout) or {}


def build(spec: BuildSpec, project_root: Path, *, torch_index: str | None = None,
          on_line: Callable[[str], None] | None = None, auto_lock: bool = True,
          on_status: Callable[[str], None] | None = None) -> BuildResult:
    status = on_status or (lambda s: None)
    require_engine()
    status(f"checking base image {spec.base}")
    python_full = base_python(spec)
    target = Target(python_full)
    if auto_lock and not (project_root / lockmod.LOCK).is_file():
        status(f"no {lockmod.LOCK}: locking for Python {python_full}")
        lockmod.lock(spec, target, project_root, torch_index=torch_index)
    status("preparing the wheelhouse and build context")
    ctx, lock_hash = prepare_context(spec, project_root, torch_index=torch_index, python_full=python_full)
    labels = {
        "org.opencontainers.image.created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "org.opencontainers.image.ref.name": spec.tag,
        "io.torchcapsule.python.full": python_full,
        "io.torchcapsule.lock.sha256": lock_hash,
    }
    # cuDNN and NCCL come from torch's nvidia-* wheels: their versions are the lock's.
    _, entries = lockmod.parse_lock((project_root / lockmod.LOCK).read_text())
    labels.update({f"io.torchcapsule.{k}": v for k, v in lockmod.cuda_components(entries).items()})
    revision = _git_revision(project_root)
    if revision:
        labels["org.opencontainers.image.revision"] = revision
    status(f"docker build {spec.tag}")
    t0 = time.monotonic()
    image_id = docker_build(ctx, spec.tag, labels, on_line=on_line, log_path=ctx / "build.log")
    return BuildResult(spec.tag, image_id, image_size(spec.tag), time.monotonic() - t0, lock_hash)


def _git_revision(root: Path) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None
