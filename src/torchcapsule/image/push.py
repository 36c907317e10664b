"""Push the built image to a registry and record its digest (the owner of "the pushed image").

A cluster pulls what it is told: a tag can move, a digest cannot. `push()` tags the local
image under the registry's repository with its semantic tag (and `latest-<flavor>` only when
asked), pushes it, and records `HOST/PREFIX/NAME@sha256:...` in `.capsule/pushed.json` next to
the lock. `pinned()` is what every cluster submission reads to name the image by digest.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageError
from .spec import BuildSpec
from .tags import format_tag

if TYPE_CHECKING:
    from ..config import Project

RECORD = Path(".capsule") / "pushed.json"
# `<tag>: digest: sha256:<hex> size: <n>`, the last line of a successful `docker push`.
_DIGEST_RE = re.compile(r"digest: (sha256:[0-9a-f]{64})")


@dataclass
class Pushed:
    """One flavor's last push: what a cluster should pull."""

    pinned: str  # HOST/PREFIX/NAME@sha256:...
    digest: str
    tags: list[str]
    image_id: str  # the local image that was pushed (a rebuild changes it)
    lock_sha256: str | None = None
    pushed_at: str = ""
    seconds: float = 0.0
    layers_pushed: int = 0
    layers_reused: int = 0


# -- pure ---------------------------------------------------------------------------------------
def registry_for(spec: BuildSpec, registry: str | None) -> str:
    """--registry, else image.registry; one line naming both when neither is set."""
    reg = (registry or spec.registry or "").strip().rstrip("/")
    if not reg:
        raise ImageError("no registry to push to: pass --registry HOST/PREFIX (e.g. 127.0.0.1:5070/acme) "
                         "or set image.registry in capsule.yaml")
    if any(c.isspace() for c in reg) or "://" in reg or reg.count(":") > 1:
        raise ImageError(f"--registry: '{reg}' is not HOST[:PORT]/PREFIX; use e.g. 127.0.0.1:5070/acme")
    return reg


def remote_tags(spec: BuildSpec, registry: str, *, latest: bool) -> list[str]:
    """The semantic tag under `registry`, plus the moving `latest-<flavor>` when asked."""
    tag = format_tag(spec.name, torch=spec.torch, cuda_tag=spec.cuda_tag, python=spec.python,
                     flavor=spec.flavor, registry=registry)
    tags = [tag]
    if latest:
        tags.append(f"{tag.rsplit(':', 1)[0]}:latest-{spec.flavor}")
    return tags


def parse_push(output: str) -> tuple[str | None, int, int]:
    """(digest, layers pushed, layers reused) from `docker push` output."""
    m = _DIGEST_RE.search(output)
    pushed = len(re.findall(r": Pushed\s*$", output, re.M))
    reused = len(re.findall(r": (Layer already exists|Mounted from .*)\s*$", output, re.M))
    return (m.group(1) if m else None), pushed, reused


def push_failure(registry: str, output: str) -> str:
    """One line: why the registry refused, and what fixes it."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else "no output"
    host = registry.split("/", 1)[0]
    low = output.lower()
    if "connection refused" in low or "no such host" in low or "i/o timeout" in low:
        fix = (f"no registry answers at {host}; start it (scripts/start-services.sh starts one at "
               f"127.0.0.1:5070) or fix --registry")
    elif "unauthorized" in low or "authentication required" in low or "no basic auth credentials" in low \
            or "denied" in low:
        fix = f"the registry requires credentials: run `docker login {host}` and retry"
    elif "server gave http response to https client" in low:
        fix = f"{host} speaks plain HTTP: add it to the engine's insecure-registries or use TLS"
    else:
        fix = "see the message above"
    return f"push to {registry} failed: {reason[:300]}; {fix}"


def record_path(project_root: Path) -> Path:
    return project_root / RECORD


def read_records(project_root: Path) -> dict[str, Pushed]:
    path = record_path(project_root)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImageError(f"{path}: unreadable ({e}); delete it and run `capsule image push` again") from None
    known = set(Pushed.__dataclass_fields__)
    return {fl: Pushed(**{k: v for k, v in rec.items() if k in known}) for fl, rec in raw.items()}


def pinned(project_root: Path, flavor: str) -> Pushed | None:
    """The last push of `flavor`, or None when it was never pushed."""
    return read_records(project_root).get(flavor)


# -- effects ------------------------------------------------------------------------------------
def write_record(project_root: Path, flavor: str, rec: Pushed) -> Path:
    records = read_records(project_root)
    records[flavor] = rec
    path = record_path(project_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(records.items())}, indent=2) + "\n")
    tmp.replace(path)  # atomic: an interrupted push never leaves half a record
    return path


def push(spec: BuildSpec, project_root: Path, *, registry: str | None = None,
         latest: bool = False, timeout: float = 1800) -> Pushed:
    """Tag, push and record. The local image must be built (`capsule image build`)."""
    from .build import docker, image_labels, require_engine

    reg = registry_for(spec, registry)
    require_engine()
    r = docker("image", "inspect", "--format", "{{.Id}}", spec.tag, check=False, timeout=30)
    if r.returncode != 0:
        raise ImageError(f"image {spec.tag} is not built; run `capsule image build --flavor {spec.flavor}` first")
    image_id = r.stdout.strip()
    tags = remote_tags(spec, reg, latest=latest)
    for t in tags:
        if t != spec.tag:
            docker("tag", spec.tag, t, timeout=30)
    t0 = time.monotonic()
    digest, n_pushed, n_reused = None, 0, 0
    for t in tags:  # the second tag's layers and manifest are already there: cheap
        r = docker("push", t, check=False, timeout=timeout)
        out = r.stdout + "\n" + r.stderr
        if r.returncode != 0:
            raise ImageError(push_failure(reg, out))
        d, p, u = parse_push(r.stdout)
        if d is None:
            raise ImageError(f"push to {reg} finished without a digest in Docker's output; "
                             f"run `docker push {t}` to see why")
        if digest is None:
            digest, n_pushed, n_reused = d, p, u
    seconds = time.monotonic() - t0
    assert digest is not None
    rec = Pushed(
        pinned=f"{tags[0].rsplit(':', 1)[0]}@{digest}", digest=digest, tags=tags, image_id=image_id,
        lock_sha256=image_labels(spec.tag).get("io.torchcapsule.lock.sha256"),
        pushed_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        seconds=round(seconds, 2), layers_pushed=n_pushed, layers_reused=n_reused,
    )
    write_record(project_root, spec.flavor, rec)
    return rec


# -- what a cluster pulls -----------------------------------------------------------------------
def _local_image_id(tag: str) -> str | None:
    """The id of the local image under `tag`; None when there is none or no Docker to ask."""
    import shutil
    import subprocess

    exe = shutil.which("docker")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def pull_ref(project: "Project", flavor: str | None = None) -> tuple[str, str | None]:
    """(the reference a cluster should pull, the refusal or None).

    The pushed digest when the last push is of the image built now; else the local tag, with
    one line saying why a cluster cannot pull it and the command that fixes it."""
    from .tags import project_tag

    flavor = flavor or project.image.flavor
    tag = project_tag(project, flavor=flavor)
    fix = (f"run `capsule image build --flavor {flavor}` if needed, then `capsule image push --flavor {flavor}"
           + ("" if project.image.registry else " --registry HOST/PREFIX") + "`")
    rec = pinned(project.root, flavor)
    if rec is None:
        return tag, f"image {tag} has not been pushed to a registry, so a cluster cannot pull it; {fix}"
    local = _local_image_id(tag)
    if local is not None and local != rec.image_id:
        return rec.pinned, (f"image {tag} was rebuilt since its last push ({rec.pinned}), so a cluster "
                            f"would run the old one; {fix}")
    return rec.pinned, None


def require_pushed(project: "Project", flavor: str | None = None) -> str:
    """The pushed digest to submit, or ImageError naming the command that pushes it."""
    ref, problem = pull_ref(project, flavor)
    if problem:
        raise ImageError(problem)
    return ref
