"""The plain data that `capsule doctor` reads from a machine.

probes.py fills these (effects); diagnose.py reads them (pure rules). Facts round-trip through
JSON, so a machine's facts can be recorded once (`capsule doctor --json`) and fed to the rules
in unit tests (tests/fixtures/doctor/*.json).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Device:
    """One GPU as torch (or, when torch cannot use it, NVML) sees it."""

    index: int
    name: str
    cc: str  # compute capability "9.0"
    total_memory: int | None = None  # bytes
    multiprocessors: int | None = None
    mig: str | None = None  # "enabled" | "disabled" | None (unknown)
    seen_by: str = "torch"  # "torch" | "nvml"


@dataclass
class Smoke:
    """A small matmul on one device, checked against a float64 CPU result."""

    device: str  # "cuda:0" | "cpu"
    ok: bool
    seconds: float | None = None
    max_rel_err: float | None = None
    error: str | None = None


@dataclass
class Bench:
    """--bench figures for one device, with the device's vendor peak where the matrix knows it."""

    device: str
    name: str
    gemm_dtype: str
    gemm_n: int
    gemm_tflops: float | None = None
    mem_gbps: float | None = None
    peak_tflops: float | None = None
    peak_gbps: float | None = None
    error: str | None = None


@dataclass
class Facts:
    # where these facts come from: "probed" (this run), "recorded: ..." (a real machine's
    # `capsule doctor --json`), or "constructed: ..." (typed in from documented values)
    source: str = "probed"
    python: str | None = None
    platform: str | None = None
    # torch
    torch_version: str | None = None  # None: torch is not importable
    torch_error: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU-only build
    torch_hip: str | None = None
    cuda_available: bool = False
    cuda_error: str | None = None  # why torch.cuda could not initialise, in torch's words
    cuda_warnings: list[str] = field(default_factory=list)
    device_count: int = 0
    devices: list[Device] = field(default_factory=list)
    arch_list: list[str] = field(default_factory=list)  # torch.cuda.get_arch_list()
    cudnn: str | None = None  # "9.10.2"
    nccl: str | None = None  # "2.27.5"
    bf16_supported: bool | None = None  # torch.cuda.is_bf16_supported() on device 0
    tf32_matmul: bool | None = None  # torch.backends.cuda.matmul.allow_tf32
    float32_matmul_precision: str | None = None
    # driver and GPUs below torch
    driver: str | None = None  # "580.65.06"
    driver_source: str | None = None  # "nvml" | "proc" | None
    driver_cuda: str | None = None  # newest CUDA the driver supports, "13.0" (NVML only)
    nvml_error: str | None = None
    nvml_devices: list[Device] = field(default_factory=list)
    dev_nvidia: list[str] = field(default_factory=list)  # /dev/nvidia* nodes
    # host
    shm_bytes: int | None = None
    in_container: bool = False
    container_evidence: list[str] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)  # NVIDIA_/CUDA_VISIBLE_DEVICES
    # the project's pins (capsule.yaml), when one was found
    project_file: str | None = None
    pinned: dict[str, str] | None = None  # {"torch": "2.13.0", "cuda": "cpu", "python": "3.11"}
    # effects run by bench.py
    smoke: list[Smoke] = field(default_factory=list)
    bench: list[Bench] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Facts":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fact(s): {', '.join(sorted(unknown))}")
        d = dict(data)
        d["devices"] = [Device(**x) for x in d.get("devices", [])]
        d["nvml_devices"] = [Device(**x) for x in d.get("nvml_devices", [])]
        d["smoke"] = [Smoke(**x) for x in d.get("smoke", [])]
        d["bench"] = [Bench(**x) for x in d.get("bench", [])]
        return cls(**d)
