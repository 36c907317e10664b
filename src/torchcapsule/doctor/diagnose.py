"""Pure rules: Facts -> Findings. No probing, no printing, no torch.

Each rule is a small function that returns the findings it makes. RULES lists them in the
order the report shows them: when CUDA is unavailable, the causes come most likely first
(a CPU-only torch explains everything; a container without GPU device nodes explains the
rest; then a driver below the wheel's floor, an architecture the wheel lacks, and a hidden
device list), followed by consequences (--require-gpus) and the environment's warnings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..compat import CPU, Matrix, arch_list_covers, load_matrix, minor_of, normalize_cuda, sm_of, version_key
from .facts import Device, Facts

ERROR, WARNING, INFO = "error", "warning", "info"
SHM_MIN_BYTES = 1 << 30  # DataLoader workers and NCCL's shared-memory transport fail below this
SHM_SUGGEST = "8g"


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str  # error (a required check failed: exit 1) | warning | info
    message: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Context:
    facts: Facts
    require_gpus: int
    matrix: Matrix

    @property
    def gpus_expected(self) -> bool:
        """Does anything say this run should have GPUs (the flag, device nodes, NVML, a CUDA pin)?"""
        f = self.facts
        pinned_cuda = (f.pinned or {}).get("cuda")
        return (self.require_gpus > 0 or bool(_gpu_nodes(f)) or bool(f.nvml_devices)
                or (pinned_cuda is not None and normalize_cuda(pinned_cuda) != CPU))


Rule = Callable[[Context], list[Finding]]


def _gpu_nodes(f: Facts) -> list[str]:
    """/dev/nvidia0, /dev/nvidia1, ... (not nvidiactl/nvidia-uvm, which exist without GPUs)."""
    return [p for p in f.dev_nvidia if p.rstrip("0123456789") == "/dev/nvidia" and p != "/dev/nvidia"]


def _base(version: str) -> str:
    return version.split("+")[0]


def _install_hint(ctx: Context) -> str:
    """`pip install torch==X --index-url .../cuXYZ` for the pinned or installed torch."""
    f, m = ctx.facts, ctx.matrix
    version = (f.pinned or {}).get("torch") or (_base(f.torch_version) if f.torch_version else None)
    rel = None
    if version:
        try:
            rel = m.release(version)
        except Exception:
            rel = None
    if rel is None:
        newest = max((r for r in m.releases.values() if r.cuda), key=lambda r: version_key(r.minor))
        rel, version = newest, newest.patches[-1]
    pinned_cuda = (f.pinned or {}).get("cuda")
    cuda = normalize_cuda(pinned_cuda) if pinned_cuda and normalize_cuda(pinned_cuda) != CPU else None
    stable = [c for c in (rel.cuda or ()) if c not in rel.experimental_cuda]
    cuda = cuda or rel.default_cuda or (stable[-1] if stable else None)
    if cuda is None:
        return f"install a CUDA build of torch {version}"
    tag = m.wheel_tag(cuda)
    return f"pip install torch=={version} --index-url https://download.pytorch.org/whl/{tag}"


def _torch_cuda_floor(ctx: Context) -> tuple[str, str, str] | None:
    """(wheel CUDA, compat floor, toolkit minimum) for the installed CUDA build, if the matrix knows it."""
    cuda = ctx.facts.torch_cuda
    if not cuda:
        return None
    try:
        info = ctx.matrix.cuda_info(cuda)
    except Exception:
        return None
    return info.version, info.compat_floor, info.min_driver


def _visible_devices(ctx: Context) -> list[Device]:
    f = ctx.facts
    return f.devices or f.nvml_devices


# -- torch itself ------------------------------------------------------------------------------
def rule_torch_missing(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if f.torch_version is not None:
        return []
    return [Finding("torch-missing", ERROR, f"torch cannot be imported ({f.torch_error})",
                    f"install it: {_install_hint(ctx) if ctx.gpus_expected else 'pip install torch'}")]


def rule_cpu_only_build(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if f.torch_version is None or f.torch_cuda or f.torch_hip:
        return []
    pinned_cpu = normalize_cuda((f.pinned or {}).get("cuda") or "x") == CPU
    # a project that pins image.cuda: cpu asked for exactly this build
    sev = ERROR if ctx.gpus_expected else (INFO if pinned_cpu else WARNING)
    gpus = ""
    if _gpu_nodes(f) or f.nvml_devices:
        gpus = "; this machine has NVIDIA GPU(s) it cannot use"
    return [Finding("cpu-only-build", sev,
                    f"CUDA unavailable: CPU-only build of torch ({f.torch_version}, torch.version.cuda is None){gpus}",
                    f"{_install_hint(ctx)} (or set image.cuda in capsule.yaml and rebuild the image)")]


# -- why a CUDA build sees no GPU ----------------------------------------------------------------
def rule_no_device_nodes(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if not f.torch_cuda or f.cuda_available or _gpu_nodes(f):
        return []
    if f.in_container:
        return [Finding("no-device-nodes", ERROR,
                        "CUDA unavailable: no /dev/nvidia* GPU device in this container; it was started "
                        "without GPU access",
                        "start it with `docker run --gpus all ...` (Kubernetes: resources.limits "
                        "nvidia.com/gpu) on a host with the NVIDIA Container Toolkit installed "
                        "(`nvidia-ctk runtime configure --runtime=docker` then restart dockerd)")]
    return [Finding("no-device-nodes", ERROR,
                    "CUDA unavailable: no /dev/nvidia* GPU device; the NVIDIA kernel driver is not loaded "
                    "or this machine has no NVIDIA GPU",
                    "install the NVIDIA driver (`nvidia-smi` must list the GPU) or run on a GPU machine")]


def rule_driver_too_old(ctx: Context) -> list[Finding]:
    f = ctx.facts
    floor = _torch_cuda_floor(ctx)
    if floor is None or f.driver is None:
        return []
    cuda, compat_floor, minimum = floor
    status = ctx.matrix.driver_status(cuda, f.driver)
    if status == "too-old":
        return [Finding("driver-too-old", ERROR,
                        f"NVIDIA driver {f.driver} is older than torch {f.torch_version} (CUDA {cuda}) needs: "
                        f"minimum {minimum}, or {compat_floor} under minor version compatibility",
                        f"upgrade the driver to >= {minimum}, or {_build_for_driver(ctx)}")]
    if status == "minor-compat":
        return [Finding("driver-minor-compat", WARNING,
                        f"NVIDIA driver {f.driver} is below CUDA {cuda}'s minimum {minimum} and runs torch "
                        f"only under minor version compatibility (floor {compat_floor}): PTX JIT and some "
                        f"newer CUDA APIs fail (cudaErrorUnsupportedPtxVersion)",
                        f"upgrade the driver to >= {minimum} (GPUs covered only by PTX, and Triton/"
                        f"torch.compile kernels, need it)")]
    return []


def _build_for_driver(ctx: Context) -> str:
    """The newest CUDA build of the installed torch that this driver runs (fully, else under
    minor version compatibility)."""
    f, m = ctx.facts, ctx.matrix
    version = _base(f.torch_version or "")
    try:
        cudas = list(m.release(version).cuda or ())
    except Exception:
        cudas = []
    for wanted in ("ok", "minor-compat"):
        fits = [c for c in cudas if m.driver_status(c, f.driver or "0") == wanted]
        if fits:
            how = "" if wanted == "ok" else " (under minor version compatibility)"
            return (f"install torch {version} from https://download.pytorch.org/whl/{m.wheel_tag(fits[-1])}, "
                    f"which driver {f.driver} runs{how}")
    return f"install a torch build for a CUDA that driver {f.driver} supports"


def rule_arch_missing(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if not f.torch_cuda:
        return []
    out = []
    cuda = normalize_cuda(f.torch_cuda)
    info = None
    try:
        info = ctx.matrix.cuda_info(cuda)
    except Exception:
        pass
    arch_list = f.arch_list or (list(ctx.matrix.archs_for(None, cuda)) if info else [])
    if not arch_list:
        return []
    ptx = None if f.arch_list else (info.ptx if info else None)
    for d in _visible_devices(ctx):
        how = arch_list_covers(arch_list, d.cc, ptx)
        sm = "sm_" + d.cc.replace(".", "")
        if how is None:
            alternatives = _alternatives(ctx, d.cc)
            out.append(Finding("arch-missing", ERROR,
                               f"GPU {d.index} ({d.name}, {sm}) has no kernels in torch {f.torch_version}: "
                               f"its arch list is {' '.join(arch_list)}",
                               alternatives))
        elif how == "ptx":
            out.append(Finding("arch-ptx-only", WARNING,
                               f"GPU {d.index} ({d.name}, {sm}) runs torch {f.torch_version} only through PTX "
                               f"JIT compilation (no {sm} binaries): slow first start, needs a driver >= the "
                               f"toolkit's",
                               "use a torch build whose arch list includes this GPU's architecture"))
    return out


def _alternatives(ctx: Context, cc: str) -> str:
    """'use torch X with cu126 (has sm_60)' — the builds that do carry this architecture."""
    f, m = ctx.facts, ctx.matrix
    version = _base(f.torch_version or "")
    try:
        cudas = m.cudas_for_arch(version, cc)
    except Exception:
        cudas = []
    if cudas:
        tags = ", ".join(m.wheel_tag(c) for c in cudas)
        return (f"install a build that has it: torch {version} from "
                f"https://download.pytorch.org/whl/{m.wheel_tag(cudas[-1])} (builds that run {sm_of(cc)}: {tags}); "
                f"set image.cuda to match")
    for rel in sorted(m.releases.values(), key=lambda r: version_key(r.minor), reverse=True):
        for c in reversed(rel.cuda or ()):
            if arch_list_covers(m.archs_for(rel.patches[-1], c), cc) == "sass":
                return (f"no build of torch {version} carries it; torch {rel.patches[-1]} with "
                        f"{m.wheel_tag(c)} does")
    return "no torch build in the matrix carries this architecture; use a newer GPU"


def rule_visible_devices_empty(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if not f.torch_cuda or f.cuda_available:
        return []
    out = []
    cvd = f.env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        out.append(Finding("cuda-visible-devices-empty", ERROR,
                           f"CUDA unavailable: CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU from this process",
                           "unset CUDA_VISIBLE_DEVICES or list device indexes/UUIDs, e.g. CUDA_VISIBLE_DEVICES=0,1"))
    nvd = f.env.get("NVIDIA_VISIBLE_DEVICES")
    if nvd is not None and nvd.strip().lower() in ("", "void", "none"):
        out.append(Finding("cuda-visible-devices-empty", ERROR,
                           f"CUDA unavailable: NVIDIA_VISIBLE_DEVICES={nvd!r} tells the NVIDIA container "
                           f"runtime to expose no GPU",
                           "start the container with NVIDIA_VISIBLE_DEVICES=all (or `--gpus all`)"))
    return out


def rule_cuda_init_failed(ctx: Context) -> list[Finding]:
    """The catch-all: a CUDA build, CUDA unavailable, and no rule above explained why."""
    f = ctx.facts
    if not f.torch_cuda or f.cuda_available:
        return []
    detail = f.cuda_error or "; ".join(f.cuda_warnings) or "no error text"
    return [Finding("cuda-init-failed", ERROR if ctx.gpus_expected else WARNING,
                    f"CUDA unavailable: torch could not initialise CUDA ({detail})",
                    "run `nvidia-smi`; if it fails, reinstall or reload the NVIDIA driver "
                    "(a driver/library version mismatch needs a reboot)")]


# -- project pins --------------------------------------------------------------------------------
def rule_pinned_mismatch(ctx: Context) -> list[Finding]:
    f = ctx.facts
    if not f.pinned or f.torch_version is None:
        return []
    out = []
    where = f.project_file or "capsule.yaml"
    want_torch = f.pinned.get("torch")
    if want_torch and _base(f.torch_version) != want_torch:
        out.append(Finding("torch-mismatch", ERROR,
                           f"torch {f.torch_version} is installed; {where} pins image.torch {want_torch}",
                           "rebuild the image (`capsule image build`) or install the pinned version"))
    want_cuda = f.pinned.get("cuda")
    if want_cuda:
        have = normalize_cuda(f.torch_cuda) if f.torch_cuda else CPU
        want = normalize_cuda(want_cuda)
        if have != want:
            out.append(Finding("cuda-build-mismatch", ERROR,
                               f"installed torch is a {'CPU' if have == CPU else 'CUDA ' + have} build; "
                               f"{where} pins image.cuda {want}",
                               "rebuild the image or install the build the project pins"))
    want_py = f.pinned.get("python")
    if want_py and f.python and minor_of(f.python) != minor_of(want_py):
        out.append(Finding("python-mismatch", WARNING,
                           f"Python {f.python} runs here; {where} pins image.python {want_py}",
                           "run inside the project image (`capsule dev` / `capsule run`)"))
    return out


# -- consequences ----------------------------------------------------------------------------------
def rule_smoke(ctx: Context) -> list[Finding]:
    return [Finding("smoke-failed", ERROR, f"matmul smoke test failed on {s.device}: {s.error}",
                    "see the causes above (arch-missing, driver-*); a failure with none of them points "
                    "at the GPU itself: check `nvidia-smi -q` for XID errors")
            for s in ctx.facts.smoke if not s.ok]


def usable_gpus(facts: Facts, matrix: Matrix) -> int:
    """Devices torch can run kernels on: visible, covered by the arch list, smoke test not failed."""
    if not facts.cuda_available:
        return 0
    failed = {s.device for s in facts.smoke if not s.ok}
    n = 0
    for d in facts.devices:
        if facts.arch_list and arch_list_covers(facts.arch_list, d.cc) is None:
            continue
        if f"cuda:{d.index}" in failed:
            continue
        n += 1
    return n


def rule_require_gpus(ctx: Context) -> list[Finding]:
    if ctx.require_gpus <= 0:
        return []
    have = usable_gpus(ctx.facts, ctx.matrix)
    if have >= ctx.require_gpus:
        return []
    seen = ctx.facts.device_count
    return [Finding("gpus-required", ERROR,
                    f"--require-gpus {ctx.require_gpus}: {have} usable CUDA device(s) "
                    f"({seen} visible to torch)",
                    "fix the causes listed above, or run on a machine with enough GPUs")]


# -- environment ------------------------------------------------------------------------------------
def rule_shm(ctx: Context) -> list[Finding]:
    b = ctx.facts.shm_bytes
    if b is None or b >= SHM_MIN_BYTES:
        return []
    return [Finding("shm-small", WARNING,
                    f"/dev/shm is {b / 2**20:.0f} MiB (< 1 GiB): DataLoader workers and NCCL's shared-memory "
                    f"transport fail with 'bus error' / 'No space left on device'",
                    f"docker run --shm-size={SHM_SUGGEST} (or --ipc=host); in capsule.yaml set "
                    f"resources.shm_size; on Kubernetes mount an emptyDir with medium: Memory at /dev/shm")]


def rule_mig(ctx: Context) -> list[Finding]:
    return [Finding("mig-enabled", INFO,
                    f"GPU {d.index} ({d.name}) is in MIG mode: a process sees one MIG instance, and NCCL "
                    f"cannot span MIG instances",
                    "pick an instance with CUDA_VISIBLE_DEVICES=MIG-<uuid> (`nvidia-smi -L`), or disable "
                    "MIG for multi-GPU training (`nvidia-smi -i N -mig 0`)")
            for d in (ctx.facts.nvml_devices or ctx.facts.devices) if d.mig == "enabled"]


def rule_precision(ctx: Context) -> list[Finding]:
    """bf16/TF32 need Ampere (8.0) or newer: say so when a GPU lacks them."""
    out = []
    for d in ctx.facts.devices:
        if version_key(d.cc) < (8, 0):
            out.append(Finding("no-bf16-tf32", INFO,
                               f"GPU {d.index} ({d.name}, compute capability {d.cc}) has no bf16 or TF32 "
                               f"tensor cores: bf16 autocast runs slowly or fails",
                               "train with fp16 autocast + GradScaler on this GPU"))
    return out


def rule_bench(ctx: Context) -> list[Finding]:
    return [Finding("bench-failed", WARNING, f"benchmark failed on {b.device}: {b.error}", None)
            for b in ctx.facts.bench if b.error]


RULES: tuple[Rule, ...] = (
    rule_torch_missing,
    rule_cpu_only_build,
    rule_no_device_nodes,
    rule_driver_too_old,
    rule_arch_missing,
    rule_visible_devices_empty,
    rule_pinned_mismatch,
    rule_smoke,
    rule_require_gpus,
    rule_shm,
    rule_mig,
    rule_precision,
    rule_bench,
)
# Causes of "CUDA unavailable" that make the catch-all redundant.
_EXPLAINS_UNAVAILABLE = {"cpu-only-build", "no-device-nodes", "driver-too-old", "arch-missing",
                         "cuda-visible-devices-empty", "torch-missing"}


def diagnose(facts: Facts, *, require_gpus: int = 0, matrix: Matrix | None = None) -> list[Finding]:
    ctx = Context(facts, require_gpus, matrix or load_matrix())
    findings: list[Finding] = []
    for rule in RULES:
        findings.extend(rule(ctx))
        if rule is rule_visible_devices_empty and not _EXPLAINS_UNAVAILABLE & {x.id for x in findings}:
            findings.extend(rule_cuda_init_failed(ctx))
    return findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.severity == ERROR for f in findings) else 0
