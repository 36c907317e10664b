"""Pieces every export shares: the image, the command, GPU needs, paths inside the container."""
from __future__ import annotations

import shlex
from pathlib import PurePosixPath
from typing import Any

import yaml

from ...config import GpuRequest, Project
from ...errors import ConfigError

WORKSPACE = PurePosixPath("/workspace")  # where the project lives in its image (the dev box mount)
GPU_RESOURCE = "nvidia.com/gpu"

# GitHub Actions rejects the @-macros; Kubernetes and Airflow accept them but one form is clearer.
_MACROS = {
    "@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
}


def image(project: Project) -> str:
    from ...image.tags import project_tag

    return project_tag(project)


def schedule_of(project: Project, target: str) -> tuple[str, str]:
    """(five-field cron, IANA timezone) or a one-line error naming the field and the fix."""
    if project.schedule is None:
        raise ConfigError(
            f"{project.root / 'capsule.yaml'}: schedule: missing; `capsule export {target}` needs "
            "schedule.cron, e.g. schedule: {cron: \"0 3 * * 1\"}"
        )
    cron = project.schedule.cron
    return _MACROS.get(cron, cron), project.schedule.timezone


def max_gpus(project: Project, stages: list[str] | None = None) -> GpuRequest:
    """The largest GPU request among the stages (a pod that runs them all needs that many)."""
    best = GpuRequest()
    for name, st in project.stages.items():
        if stages is not None and name not in stages:
            continue
        if st.resources.gpus.count > best.count:
            best = st.resources.gpus
    return best


def volume_paths(project: Project) -> dict[str, str]:
    """Each volume's path inside the container, as capsule.yaml resolves it from /workspace."""
    out = {}
    for name in ("workspace", "data", "models", "logs"):
        p = PurePosixPath(getattr(project.volumes, name))
        out[name] = str(p if p.is_absolute() else PurePosixPath(*(WORKSPACE / p).parts))
    out = {k: _norm(v) for k, v in out.items()}
    return out


def _norm(path: str) -> str:
    parts: list[str] = []
    for part in PurePosixPath(path).parts[1:]:
        if part == "..":
            if parts:
                parts.pop()
        elif part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def pipeline_argv(on: str = "local", extra: tuple[str, ...] = ()) -> list[str]:
    return ["capsule", "pipeline", "run", "--on", on, *extra]


def shell(argv: list[str]) -> str:
    return shlex.join(argv)


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a project name (Kubernetes names allow no '_' or '.')."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out[:52] or "capsule"


def dump_yaml(docs: list[dict[str, Any]] | dict[str, Any], header: str) -> str:
    """YAML with a comment header saying how it was made; a list becomes a multi-document file."""
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # repeated labels as plain copies, not &id001 anchors
            return True

    def _str(dumper, data):  # multi-line strings (scripts) as blocks, which read like the source
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    body = docs if isinstance(docs, list) else [docs]
    text = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=110) for d in body)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + text


def tracking_env(project: Project) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": project.registry.tracking_uri} if project.registry.tracking_uri else {}
