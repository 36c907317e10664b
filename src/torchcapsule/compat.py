"""The torch/CUDA/Python/driver/GPU-architecture matrix (data/compat.yaml) and its rules.

Pure: no probing. `capsule validate`, `capsule image` and `capsule doctor` ask these
questions; every refusal lists the valid choices.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from .errors import CompatError

CPU = "cpu"


@dataclass(frozen=True)
class CudaInfo:
    version: str  # "12.8"
    tag: str  # "cu128"
    min_driver: str  # full-toolkit minimum Linux driver
    compat_floor: str  # minimum driver under minor version compatibility
    archs: tuple[str, ...]  # sm_XX compiled into torch's wheels for this CUDA


@dataclass(frozen=True)
class TorchRelease:
    minor: str  # "2.9"
    patches: tuple[str, ...]
    cuda: tuple[str, ...]
    experimental_cuda: tuple[str, ...]
    python: tuple[str, ...]
    torchvision: str | None
    torchaudio: str | None


@dataclass(frozen=True)
class GpuModel:
    name: str
    cc: str  # compute capability "9.0"
    arch: str
    bf16_tflops: float | None
    mem_gbps: float | None

    @property
    def sm(self) -> str:
        return "sm_" + self.cc.replace(".", "")


def version_key(v: str) -> tuple[int, ...]:
    """'570.26' -> (570, 26); non-numeric parts are dropped (e.g. '2.9.1+cu128')."""
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def minor_of(version: str) -> str:
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


class Matrix:
    def __init__(self, data: dict) -> None:
        arch_lists = data["arch_lists"]
        self.cudas: dict[str, CudaInfo] = {
            v: CudaInfo(v, d["tag"], d["min_driver"], d["compat_floor"], tuple(arch_lists[v]))
            for v, d in data["cuda"].items()
        }
        self.releases: dict[str, TorchRelease] = {
            m: TorchRelease(
                minor=m,
                patches=tuple(d["patches"]),
                cuda=tuple(d["cuda"]),
                experimental_cuda=tuple(d.get("experimental_cuda", [])),
                python=tuple(d["python"]),
                torchvision=d.get("torchvision"),
                torchaudio=d.get("torchaudio"),
            )
            for m, d in data["torch"].items()
        }
        self.gpus: dict[str, GpuModel] = {
            n: GpuModel(n, d["cc"], d["arch"], d.get("bf16_tflops"), d.get("mem_gbps"))
            for n, d in data["gpus"].items()
        }

    # -- lookups -----------------------------------------------------------------------------
    def release(self, torch: str, *, where: str = "torch") -> TorchRelease:
        rel = self.releases.get(minor_of(torch))
        if rel is None:
            raise CompatError(
                f"{where}: torch {torch} is not in the compatibility matrix; "
                f"supported: {', '.join(self.all_torch_versions())}"
            )
        if torch.count(".") >= 2 and torch.split("+")[0] not in rel.patches:
            raise CompatError(
                f"{where}: torch {torch} was never released; releases of {rel.minor}: "
                f"{', '.join(rel.patches)}"
            )
        return rel

    def cuda_info(self, cuda: str, *, where: str = "cuda") -> CudaInfo:
        cuda = normalize_cuda(cuda)
        info = self.cudas.get(cuda)
        if info is None:
            raise CompatError(
                f"{where}: CUDA {cuda} is not a CUDA that torch wheels are built for; "
                f"known: {', '.join(self.cudas)} or 'cpu'"
            )
        return info

    def gpu(self, name: str) -> GpuModel | None:
        key = name.upper().replace(" ", "").replace("-", "")
        for n, g in self.gpus.items():
            if n.upper() == key:
                return g
        return None

    def all_torch_versions(self) -> list[str]:
        return [p for r in self.releases.values() for p in r.patches]

    def latest_patch(self, torch: str) -> str:
        return self.release(torch).patches[-1]

    # -- rules -------------------------------------------------------------------------------
    def check(self, torch: str, cuda: str, python: str, *, where: str = "image") -> None:
        """Refuse a torch/CUDA/Python combination that has no wheel, listing what exists."""
        rel = self.release(torch, where=f"{where}.torch")
        cuda = normalize_cuda(cuda)
        if cuda != CPU and cuda not in rel.cuda:
            raise CompatError(
                f"{where}.cuda: torch {torch} has no CUDA {cuda} build; "
                f"valid: {', '.join(rel.cuda)} or cpu"
            )
        if minor_of(python) not in rel.python:
            raise CompatError(
                f"{where}.python: torch {torch} has no wheel for Python {python}; "
                f"valid: {', '.join(rel.python)}"
            )

    def driver_ok(self, cuda: str, driver: str) -> tuple[bool, str]:
        """(ok, minimum) for running a wheel built with `cuda` on `driver`.

        Minor version compatibility lets a newer 12.x wheel run on an older 12.x driver
        above the floor, so the floor is the hard limit; below the full-toolkit minimum
        some features (PTX JIT) are lost, which the doctor reports as a warning.
        """
        info = self.cuda_info(cuda)
        ok = version_key(driver) >= version_key(info.compat_floor)
        return ok, info.compat_floor

    def arch_supported(self, cuda: str, cc: str) -> bool:
        """Does torch's CUDA `cuda` build carry kernels for compute capability `cc` ('6.1')?"""
        if normalize_cuda(cuda) == CPU:
            return False
        sm = "sm_" + cc.replace(".", "")
        archs = self.cuda_info(cuda).archs
        # A binary for sm_XY runs on sm_XZ with Z >= Y (same major), so sm_86 covers 8.9.
        major = sm[3:-1]
        minor = int(sm[-1])
        return any(a[3:-1] == major and int(a[-1]) <= minor for a in archs)

    def wheel_tag(self, cuda: str) -> str:
        cuda = normalize_cuda(cuda)
        return CPU if cuda == CPU else self.cuda_info(cuda).tag


def normalize_cuda(cuda: str) -> str:
    """'cu128' / '12.8' / 'CPU' -> '12.8' / 'cpu'."""
    c = str(cuda).strip().lower()
    if c == CPU:
        return CPU
    if c.startswith("cu") and c[2:].isdigit() and len(c) >= 5:
        digits = c[2:]
        return f"{digits[:-1]}.{digits[-1]}"
    return c


@functools.lru_cache(maxsize=1)
def load_matrix() -> Matrix:
    import yaml

    text = resources.files("torchcapsule.data").joinpath("compat.yaml").read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return Matrix(yaml.load(text, Loader=loader))
