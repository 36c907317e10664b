"""The resolved build spec: capsule.yaml's `image:` plus command-line overrides, validated.

Pure: no Docker, no network. Every refusal is one line naming the flag (or the capsule.yaml
field) that caused it and the fix.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from ..compat import CPU, load_matrix, minor_of, normalize_cuda
from ..config import Project
from ..errors import CompatError, ConfigError

FLAVORS = ("jupyter-ssh", "slim")

# The base image used when neither --base nor image.base is given, by Python minor version,
# with the python3 that base's own distribution ships (no third-party repositories, so the
# image's Python is exactly the distribution's). For other Pythons there is no honest default:
# we refuse and ask for --base.
DEFAULT_BASES: dict[str, str] = {
    "3.10": "ubuntu:22.04",
    "3.11": "debian:bookworm",
    "3.12": "ubuntu:24.04",
    "3.13": "debian:trixie",
}
# Full python3 versions of known bases (used to resolve wheels when Docker cannot be asked).
KNOWN_PYTHONS: dict[str, str] = {
    "ubuntu:22.04": "3.10.12",
    "debian:bookworm": "3.11.2",
    "local/debian:bookworm": "3.11.2",
    "ubuntu:24.04": "3.12.3",
    "debian:trixie": "3.13.5",
}

PYTORCH_INDEX = "https://download.pytorch.org/whl"
# The Python packages each flavor adds on top of torch + image.pip. torchcapsule's own
# runtime needs are always there: `capsule doctor` and stage runs work inside every image.
CAPSULE_RUNTIME = ("click>=8.1", "rich>=13", "pydantic>=2.6", "pyyaml>=6", "packaging>=23")
DEV_PACKAGES = ("jupyterlab>=4",)


@dataclass(frozen=True)
class BuildSpec:
    name: str
    torch: str  # full release, e.g. "2.13.0"
    cuda: str  # "cpu" or "12.8"
    cuda_tag: str  # "cpu" or "cu128"
    python: str  # minor, e.g. "3.11"
    flavor: str
    base: str
    base_is_default: bool
    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    user: str = "mluser"
    uid: int = 1000
    gid: int = 1000
    registry: str | None = None
    min_driver: str | None = None  # driver floor for this CUDA (entrypoint warns below it)
    pypi_cuda: str | None = None  # the CUDA of this release's PyPI build (compat: default_cuda)
    compilers: bool | None = None  # image.compilers; None: the flavor's default
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.cuda != CPU

    @property
    def tag(self) -> str:
        from .tags import format_tag

        return format_tag(self.name, torch=self.torch, cuda_tag=self.cuda_tag, python=self.python,
                          flavor=self.flavor, registry=self.registry)

    @property
    def torch_from_pypi(self) -> bool:
        """PyPI's own torch wheel is this build (PyPI uses no local version label)."""
        return self.is_cuda and self.cuda == self.pypi_cuda

    @property
    def torch_requirement(self) -> str:
        # The local version label (+cpu / +cu128) makes the choice of wheel explicit. PyPI's
        # build has none; `===` (exact string) keeps pip from taking a `+cpu` wheel that a
        # find-links directory or the wheelhouse offers, which `==X` would also match.
        if self.torch_from_pypi:
            return f"torch==={self.torch}"
        return f"torch=={self.torch}+{self.cuda_tag}"

    @property
    def torch_index(self) -> str:
        return f"{PYTORCH_INDEX}/{self.cuda_tag}"

    def torch_index_for(self, explicit: str | None) -> str | None:
        """The PyTorch index a lock/build asks: the flag's (or CAPSULE_TORCH_INDEX's, read by the
        wheelhouse), none for PyPI's build, else the official index of this build."""
        if explicit:
            return explicit
        return None if self.torch_from_pypi else self.torch_index

    @property
    def has_dev_tools(self) -> bool:
        return self.flavor == "jupyter-ssh"

    @property
    def needs_compiler(self) -> bool:
        # torch.compile: Inductor's C++ kernels on CPU and Triton's launcher stubs on CUDA
        # are compiled at run time (gcc + Python.h). By default the dev flavor has them, a slim
        # CUDA image keeps them for Triton and a slim CPU image (eager) does not; image.compilers
        # decides otherwise (an eager-only CUDA image saves their ~0.2 GB, docs/image.md).
        if self.compilers is not None:
            return self.compilers
        return self.has_dev_tools or self.is_cuda

    def requirements(self, *, dev: bool) -> list[str]:
        """What `capsule image lock` resolves: runtime set, or the dev extras."""
        if dev:
            return list(DEV_PACKAGES)
        return [self.torch_requirement, *self.pip, *CAPSULE_RUNTIME]

    def with_flavor(self, flavor: str) -> "BuildSpec":
        return replace(self, flavor=check_flavor(flavor, "--flavor"))


def check_flavor(flavor: str, where: str) -> str:
    if flavor not in FLAVORS:
        close = difflib.get_close_matches(flavor, FLAVORS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError.at(where, f"unknown flavor '{flavor}'{hint}; valid: {', '.join(FLAVORS)}")
    return flavor


def resolve(project: Project, *, torch: str | None = None, cuda: str | None = None,
            python: str | None = None, flavor: str | None = None, base: str | None = None) -> BuildSpec:
    """capsule.yaml's image section with flags on top, checked against the compat matrix."""
    img = project.image
    matrix = load_matrix()

    def where(flag_value: object, flag: str, field_name: str) -> str:
        return flag if flag_value is not None else f"capsule.yaml: image.{field_name}"

    t = torch if torch is not None else img.torch
    c = normalize_cuda(cuda) if cuda is not None else img.cuda
    p = python if python is not None else img.python
    f = check_flavor(flavor if flavor is not None else img.flavor, where(flavor, "--flavor", "flavor"))
    if p.count(".") != 1 or not all(x.isdigit() for x in p.split(".")):
        raise ConfigError.at(where(python, '--python', 'python'), f"'{p}' is not a Python minor version; use e.g. 3.11")

    rel = matrix.release(t, where=where(torch, "--torch", "torch"))
    full_torch = t if t.count(".") >= 2 else rel.patches[-1]
    if c != CPU:
        info = matrix.cuda_info(c, where=where(cuda, "--cuda", "cuda"))
        if c not in rel.cuda:
            raise CompatError.at(
                where(cuda, '--cuda', 'cuda'), f"torch {full_torch} has no CUDA {c} build "
                f"(no such wheel on the PyTorch index); valid: {', '.join(rel.cuda)} or cpu"
            )
        cuda_tag, min_driver = info.tag, info.compat_floor
    else:
        cuda_tag, min_driver = CPU, None
    if minor_of(p) not in rel.python:
        flag = where(python, "--python", "python") if python is not None or torch is None else "--torch"
        raise CompatError.at(
            flag, f"torch {full_torch} has no wheel for Python {p}; valid: {', '.join(rel.python)}"
        )

    chosen = base if base is not None else img.base
    if chosen is None:
        chosen = DEFAULT_BASES.get(p)
        if chosen is None:
            raise ConfigError.at(
                where(python, '--python', 'python'), f"no default base image ships Python {p} "
                f"(defaults: {', '.join(f'{v} on {b}' for v, b in DEFAULT_BASES.items())}); "
                f"pass --base IMAGE (or set image.base) to an image whose python3 is {p}"
            )
        is_default = True
    else:
        is_default = False
        if not chosen.strip() or any(ch.isspace() for ch in chosen):
            raise ConfigError.at(where(base, '--base', 'base'), f"'{chosen}' is not an image reference; use e.g. ubuntu:24.04")

    return BuildSpec(
        name=project.name, torch=full_torch, cuda=c, cuda_tag=cuda_tag, python=p, flavor=f,
        base=chosen, base_is_default=is_default, pip=tuple(img.pip), apt=tuple(img.apt),
        user=img.user.name, uid=img.user.uid, gid=img.user.gid or img.user.uid,
        registry=img.registry, min_driver=min_driver, pypi_cuda=rel.default_cuda, compilers=img.compilers,
    )
