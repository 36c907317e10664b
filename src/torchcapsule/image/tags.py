"""Semantic, unambiguous image tags: <repo>/<name>:<torch>-<cuda tag>-py<python>-<flavor>."""
from __future__ import annotations

from ..compat import load_matrix
from ..config import Image, Project


def format_tag(name: str, *, torch: str, cuda_tag: str, python: str, flavor: str,
               registry: str | None = None) -> str:
    """The one tag format: 'digits:2.13.0-cpu-py3.11-jupyter-ssh', prefixed by a registry if set."""
    repo = f"{registry.rstrip('/')}/{name}" if registry else name
    return f"{repo}:{torch}-{cuda_tag}-py{python}-{flavor}"


def tag_for(name: str, image: Image) -> str:
    matrix = load_matrix()
    torch = image.torch if image.torch.count(".") >= 2 else matrix.latest_patch(image.torch)
    return format_tag(name, torch=torch, cuda_tag=matrix.wheel_tag(image.cuda), python=image.python,
                      flavor=image.flavor, registry=image.registry)


def project_tag(project: Project, *, flavor: str | None = None) -> str:
    image = project.image if flavor is None else project.image.model_copy(update={"flavor": flavor})
    return tag_for(project.name, image)
