"""The torch/CUDA/Python/driver/GPU-architecture matrix (data/compat.yaml) and its rules.

Pure: no probing. `capsule validate`, `capsule image` and `capsule doctor` ask these
questions; every refusal lists the valid choices.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources

from .errors import CompatError

CPU = "cpu"


@dataclass(frozen=True)
class CudaInfo:
    version: str  # "12.8"
    tag: str  # "cu128"
    min_driver: str  # minimum Linux driver of the toolkit's GA release
    compat_floor: str  # minimum driver under minor version compatibility
    archs: tuple[str, ...]  # sm_XX compiled into torch's wheels for this CUDA (newest release)
    ptx: str | None = None  # arch whose PTX is shipped too (JIT for newer GPUs)
    min_driver_update: str | None = None  # the toolkit update torch builds with, if newer


@dataclass(frozen=True)
class TorchRelease:
    minor: str  # "2.9"
    patches: tuple[str, ...]
    cuda: tuple[str, ...] | None  # None: the release's CUDA builds are not confirmed
    experimental_cuda: tuple[str, ...]
    python: tuple[str, ...]
    torchvision: str | None
    torchaudio: str | None
    archs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per-CUDA overrides
    default_cuda: str | None = None  # the build PyPI serves


@dataclass(frozen=True)
class GpuModel:
    name: str
    cc: str  # compute capability "9.0"
    arch: str
    bf16_tflops: float | None
    mem_gbps: float | None
    match: tuple[str, ...] = ()

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


def sm_of(cc: str) -> str:
    """'8.9' -> 'sm_89', '10.0' -> 'sm_100'; an 'sm_89' passes through."""
    cc = cc.strip()
    return cc if cc.startswith("sm_") else "sm_" + cc.replace(".", "")


def _split_sm(sm: str) -> tuple[int, int]:
    """'sm_89' -> (8, 9), 'sm_120' -> (12, 0), 'compute_90a' -> (9, 0)."""
    digits = "".join(ch for ch in sm.split("_", 1)[-1] if ch.isdigit())
    return int(digits[:-1] or 0), int(digits[-1])


def arch_list_covers(arch_list: list[str] | tuple[str, ...], cc: str, ptx: str | None = None) -> str | None:
    """How a list of compiled architectures runs a GPU of compute capability `cc`.

    'sass' when a cubin for sm_XY with the same major and Y <= the GPU's minor exists (an
    sm_86 binary runs on 8.9); 'ptx' when only PTX of an older architecture exists, which the
    driver JIT-compiles (needs a driver at least as new as the toolkit); None when nothing runs.
    The list may be torch.cuda.get_arch_list() output, where PTX shows as 'compute_XY'.
    Arch-specific cubins ('sm_90a') run only on exactly that GPU and are ignored for others.
    """
    major, minor = _split_sm(sm_of(cc))
    ptx_archs = [a for a in arch_list if a.startswith("compute_")] + ([ptx] if ptx else [])
    for a in arch_list:
        if not a.startswith("sm_"):
            continue
        a_major, a_minor = _split_sm(a)
        if a.endswith(("a", "f")):
            if (a_major, a_minor) == (major, minor):
                return "sass"
            continue
        if a_major == major and a_minor <= minor:
            return "sass"
    if any(_split_sm(p) <= (major, minor) for p in ptx_archs):
        return "ptx"
    return None


class Matrix:
    def __init__(self, data: dict) -> None:
        arch_lists = data["arch_lists"]
        self.cudas: dict[str, CudaInfo] = {
            v: CudaInfo(
                v, d["tag"], d["min_driver"], d["compat_floor"],
                tuple(arch_lists[v]["archs"]), arch_lists[v].get("ptx"), d.get("min_driver_update"),
            )
            for v, d in data["cuda"].items()
        }
        self.releases: dict[str, TorchRelease] = {
            m: TorchRelease(
                minor=m,
                patches=tuple(d["patches"]),
                cuda=None if d.get("cuda") is None else tuple(d["cuda"]),
                experimental_cuda=tuple(d.get("experimental_cuda", [])),
                python=tuple(d["python"]),
                torchvision=d.get("torchvision"),
                torchaudio=d.get("torchaudio"),
                archs={c: tuple(a) for c, a in (d.get("archs") or {}).items()},
                default_cuda=d.get("default_cuda"),
            )
            for m, d in data["torch"].items()
        }
        self.gpus: dict[str, GpuModel] = {
            n: GpuModel(n, d["cc"], d["arch"], d.get("bf16_tflops"), d.get("mem_gbps"),
                        tuple(d.get("match", ())))
            for n, d in data["gpus"].items()
        }

    # -- lookups -----------------------------------------------------------------------------
    def release(self, torch: str, *, where: str = "torch") -> TorchRelease:
        rel = self.releases.get(minor_of(torch))
        if rel is None:
            raise CompatError.at(
                where, f"torch {torch} is not in the compatibility matrix; "
                f"supported: {', '.join(self.all_torch_versions())}"
            )
        if torch.count(".") >= 2 and torch.split("+")[0] not in rel.patches:
            raise CompatError.at(
                where, f"torch {torch} was never released; releases of {rel.minor}: "
                f"{', '.join(rel.patches)}"
            )
        return rel

    def cuda_info(self, cuda: str, *, where: str = "cuda") -> CudaInfo:
        cuda = normalize_cuda(cuda)
        info = self.cudas.get(cuda)
        if info is None:
            raise CompatError.at(
                where, f"CUDA {cuda} is not a CUDA that torch wheels are built for; "
                f"known: {', '.join(self.cudas)} or 'cpu'"
            )
        return info

    @staticmethod
    def _key(name: str) -> str:
        return name.upper().replace(" ", "").replace("-", "").replace("_", "")

    def gpu(self, name: str) -> GpuModel | None:
        """A GPU by its table name ('H100', 'h100-pcie'), as capsule.yaml's `gpus: H100:4` names it."""
        key = self._key(name)
        for n, g in self.gpus.items():
            if self._key(n) == key:
                return g
        return None

    def gpu_for_device(self, device_name: str) -> GpuModel | None:
        """The table entry for torch.cuda.get_device_name() text ('NVIDIA H100 80GB HBM3')."""
        for g in self.gpus.values():
            # whole-word match, so "L4" does not claim "NVIDIA L40S"
            if any(re.search(rf"(?<![A-Za-z0-9]){re.escape(m)}(?![A-Za-z0-9])", device_name) for m in g.match):
                return g
        return None

    def all_torch_versions(self) -> list[str]:
        return [p for r in self.releases.values() for p in r.patches]

    def latest_patch(self, torch: str) -> str:
        return self.release(torch).patches[-1]

    def archs_for(self, torch: str | None, cuda: str) -> tuple[str, ...]:
        """SASS architectures of torch `torch`'s CUDA `cuda` wheel (newest release if torch is None)."""
        info = self.cuda_info(cuda)
        if torch is not None:
            rel = self.release(torch)
            if info.version in rel.archs:
                return rel.archs[info.version]
        return info.archs

    # -- rules -------------------------------------------------------------------------------
    def check(self, torch: str, cuda: str, python: str, *, where: str = "image") -> None:
        """Refuse a torch/CUDA/Python combination that has no wheel, listing what exists."""
        rel = self.release(torch, where=f"{where}.torch")
        cuda = normalize_cuda(cuda)
        if cuda != CPU and rel.cuda is None:
            self.cuda_info(cuda, where=f"{where}.cuda")  # nonsense CUDA: say so first
            raise CompatError.at(
                f"{where}.cuda", f"the CUDA builds of torch {torch} are not confirmed in the "
                f"compatibility matrix; valid: cpu, or a torch release up to "
                f"{self._newest_confirmed()} with CUDA"
            )
        if cuda != CPU and cuda not in (rel.cuda or ()):
            raise CompatError.at(
                f"{where}.cuda", f"torch {torch} has no CUDA {cuda} build; "
                f"valid: {', '.join(rel.cuda or ())} or cpu"
            )
        if minor_of(python) not in rel.python:
            raise CompatError.at(
                f"{where}.python", f"torch {torch} has no wheel for Python {python}; "
                f"valid: {', '.join(rel.python)}"
            )

    def check_companion(self, torch: str, package: str, version: str, *, where: str = "image.pip") -> None:
        """Refuse a torchvision/torchaudio pin that does not belong to `torch` (e.g. torchvision
        0.20 with torch 2.13), naming the minor version that does."""
        rel = self.release(torch)
        want = {"torchvision": rel.torchvision, "torchaudio": rel.torchaudio}.get(package)
        if package not in ("torchvision", "torchaudio"):
            return
        if want is None:
            if package == "torchaudio" and version_key(rel.minor) > version_key("2.11"):
                raise CompatError.at(where, f"torchaudio has no release for torch {rel.minor} "
                                  f"(the last is 2.11, for torch 2.11); remove it or use torch <= 2.11")
            return  # unconfirmed pairing: nothing to refuse with
        if minor_of(version) != want:
            raise CompatError.at(where, f"{package} {version} does not match torch {torch}; "
                              f"valid: {package}=={want}.*")

    def _newest_confirmed(self) -> str:
        confirmed = [r for r in self.releases.values() if r.cuda is not None]
        return max(confirmed, key=lambda r: version_key(r.minor)).patches[-1]

    def driver_status(self, cuda: str, driver: str) -> str:
        """'ok' (driver >= the toolkit's minimum), 'minor-compat' (runs under minor version
        compatibility: at or above the floor, below the minimum, so PTX JIT and some newer
        APIs fail) or 'too-old' (below the floor: CUDA cannot initialise)."""
        info = self.cuda_info(cuda)
        d = version_key(driver)
        if d >= version_key(info.min_driver):
            return "ok"
        if d >= version_key(info.compat_floor):
            return "minor-compat"
        return "too-old"

    def driver_ok(self, cuda: str, driver: str) -> tuple[bool, str]:
        """(ok, minimum) for running a wheel built with `cuda` on `driver`.

        Minor version compatibility lets a newer 12.x wheel run on an older 12.x driver
        above the floor, so the floor is the hard limit; below the full-toolkit minimum
        some features (PTX JIT) are lost, which the doctor reports as a warning.
        """
        info = self.cuda_info(cuda)
        return self.driver_status(cuda, driver) != "too-old", info.compat_floor

    def arch_coverage(self, cuda: str, cc: str, *, torch: str | None = None) -> str | None:
        """'sass', 'ptx' or None: how torch's `cuda` build runs a GPU of compute capability `cc`."""
        if normalize_cuda(cuda) == CPU:
            return None
        info = self.cuda_info(cuda)
        return arch_list_covers(self.archs_for(torch, cuda), cc, info.ptx)

    def arch_supported(self, cuda: str, cc: str, *, torch: str | None = None) -> bool:
        """Does torch's CUDA `cuda` build carry kernels for compute capability `cc` ('6.1')?"""
        return self.arch_coverage(cuda, cc, torch=torch) is not None

    def cudas_for_arch(self, torch: str, cc: str) -> list[str]:
        """The CUDA builds of `torch` that carry SASS for `cc` (for 'use cuXYZ instead' fixes)."""
        rel = self.release(torch)
        return [c for c in (rel.cuda or ())
                if arch_list_covers(self.archs_for(torch, c), cc) == "sass"]

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
