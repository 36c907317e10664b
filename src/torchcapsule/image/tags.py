"""Semantic, unambiguous image tags: <repo>/<name>:<torch>-<cuda tag>-py<python>-<flavor>."""
from __future__ import annotations

from ..compat import load_matrix
from ..config import Image, Project


def tag_for(name: str, image: Image) -> str:
    """'digits:2.13.0-cpu-py3.11-jupyter-ssh' (prefixed by image.registry when set)."""
    matrix = load_matrix()
    torch = image.torch if image.torch.count(".") >= 2 else matrix.latest_patch(image.torch)
    repo = f"{image.registry.rstrip('/')}/{name}" if image.registry else name
    return f"{repo}:{torch}-{matrix.wheel_tag(image.cuda)}-py{image.python}-{image.flavor}"


def project_tag(project: Project, *, flavor: str | None = None) -> str:
    image = project.image if flavor is None else project.image.model_copy(update={"flavor": flavor})
    return tag_for(project.name, image)
