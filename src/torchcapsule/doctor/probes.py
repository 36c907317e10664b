"""Read the machine into Facts. Effects only, no opinions: judging is diagnose.py's job.

Each probe catches its own failures and records them as facts (a missing NVML, a torch that
cannot initialise CUDA), so one broken part never hides the others. torch and pynvml are
imported inside the functions that use them.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import sys
import warnings
from pathlib import Path

from .facts import Device, Facts

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
_CGROUP_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc", "crio", "buildkit")


# -- pure parsers (unit-tested with recorded text) ---------------------------------------------
def parse_proc_driver_version(text: str) -> str | None:
    """'NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ...' -> '580.65.06'."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def parse_arch_flags(flags: str | None) -> list[str]:
    """torch's compiled CUDA arch flags -> get_arch_list()-style names, in order.

    '-gencode;arch=compute_75,code=sm_75;...;arch=compute_120,code=compute_120' -> ['sm_75', ..., 'compute_120']
    (only the code= targets count: arch= names the virtual architecture the code is built from).
    'sm_75 sm_80' (the plain form) passes through.
    """
    if not flags:
        return []
    codes = re.findall(r"code=((?:sm|compute)_\d+[af]?)", flags) or re.findall(r"(?:sm|compute)_\d+[af]?", flags)
    return list(dict.fromkeys(codes))


def container_evidence(*, dockerenv: bool, containerenv: bool, cgroup: str, env: dict) -> list[str]:
    """Why we believe we run in a container (empty list: we do not)."""
    out = []
    if dockerenv:
        out.append("/.dockerenv")
    if containerenv:
        out.append("/run/.containerenv")
    for line in cgroup.splitlines():
        if any(m in line for m in _CGROUP_MARKERS):
            out.append(f"/proc/1/cgroup: {line.strip()}")
            break
    if env.get("KUBERNETES_SERVICE_HOST"):
        out.append("KUBERNETES_SERVICE_HOST is set")
    if env.get("container"):
        out.append(f"container={env['container']}")
    return out


def format_cudnn(v: int | None) -> str | None:
    """torch.backends.cudnn.version(): 91002 -> '9.10.2' (cuDNN 9: M*10000 + m*100 + p)."""
    if not v:
        return None
    if v >= 10000:
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"  # cuDNN 8: M*1000 + m*100 + p


# -- probes ------------------------------------------------------------------------------------
def probe(pinned: dict[str, str] | None = None, project_file: str | None = None) -> Facts:
    f = Facts(source="probed", python=platform.python_version(),
              platform=f"{platform.system()} {platform.release()} {platform.machine()}")
    f.project_file, f.pinned = project_file, pinned
    f.env = {k: os.environ.get(k) for k in ENV_VARS}
    f.dev_nvidia = sorted(glob.glob("/dev/nvidia*"))
    f.shm_bytes = _shm_bytes()
    f.container_evidence = container_evidence(
        dockerenv=Path("/.dockerenv").exists(),
        containerenv=Path("/run/.containerenv").exists(),
        cgroup=_read("/proc/1/cgroup") or "",
        env=dict(os.environ),
    )
    f.in_container = bool(f.container_evidence)
    _probe_driver(f)
    _probe_torch(f)
    return f


def gpu_names() -> list[str]:
    """The NVIDIA GPUs of this machine by name ([] without nvidia-smi or a working driver): what a
    GPU request is checked against before a job starts (launch backends, `capsule dev`)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        r = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []


def visible_gpus() -> int:
    """How many GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set, else gpu_names()."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    return len(gpu_names())


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _shm_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def _probe_driver(f: Facts) -> None:
    """Driver version and GPUs from NVML; the driver from /proc when NVML is unusable."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        f.nvml_error = "nvidia-ml-py is not installed"
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                f.driver = _text(pynvml.nvmlSystemGetDriverVersion())
                f.driver_source = "nvml"
                cv = pynvml.nvmlSystemGetCudaDriverVersion()  # 13000 -> "13.0"
                f.driver_cuda = f"{cv // 1000}.{cv % 1000 // 10}"
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                    try:
                        current, _pending = pynvml.nvmlDeviceGetMigMode(h)
                        mig = "enabled" if current else "disabled"
                    except pynvml.NVMLError:
                        mig = None  # not a MIG-capable GPU
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
                    f.nvml_devices.append(Device(i, _text(pynvml.nvmlDeviceGetName(h)), f"{major}.{minor}",
                                                 total_memory=mem, mig=mig, seen_by="nvml"))
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            f.nvml_error = f"{type(e).__name__}: {e}"
    if f.driver is None:
        text = _read("/proc/driver/nvidia/version")
        if text:
            f.driver = parse_proc_driver_version(text)
            f.driver_source = "proc" if f.driver else None


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _probe_torch(f: Facts) -> None:
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install raising OSError on a .so
        f.torch_error = f"{type(e).__name__}: {e}"
        return
    f.torch_version = torch.__version__
    f.torch_cuda = torch.version.cuda
    f.torch_hip = getattr(torch.version, "hip", None)
    f.tf32_matmul = bool(torch.backends.cuda.matmul.allow_tf32)
    f.float32_matmul_precision = torch.get_float32_matmul_precision()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f.cuda_available = bool(torch.cuda.is_available())
        if f.cuda_available:
            f.device_count = torch.cuda.device_count()
            for i in range(f.device_count):
                p = torch.cuda.get_device_properties(i)
                mig = next((d.mig for d in f.nvml_devices if d.index == i), None)
                f.devices.append(Device(i, p.name, f"{p.major}.{p.minor}", total_memory=p.total_memory,
                                        multiprocessors=p.multi_processor_count, mig=mig))
            try:
                f.bf16_supported = bool(torch.cuda.is_bf16_supported())
            except Exception:
                f.bf16_supported = None
    f.cuda_warnings = sorted({str(w.message).strip() for w in caught})
    if f.torch_cuda:
        f.arch_list = list(torch.cuda.get_arch_list()) if f.cuda_available else _compiled_arch_list(torch)
        if not f.cuda_available:
            f.cuda_error = _cuda_init_error(torch)
    if torch.backends.cudnn.is_available():
        try:
            f.cudnn = format_cudnn(torch.backends.cudnn.version())
        except Exception:
            f.cudnn = None
    if f.torch_cuda:
        try:
            f.nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:
            f.nccl = None


def _compiled_arch_list(torch) -> list[str]:
    """get_arch_list() returns [] when CUDA is unavailable; the flags are compiled in anyway."""
    try:
        return parse_arch_flags(torch._C._cuda_getArchFlags())
    except Exception:
        return []


def _cuda_init_error(torch) -> str | None:
    try:
        torch.cuda.init()
    except Exception as e:
        return f"{type(e).__name__}: {e}".strip()
    return None


def main() -> None:  # pragma: no cover - `python -m torchcapsule.doctor.probes` records facts
    import json

    json.dump(probe().to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main()
