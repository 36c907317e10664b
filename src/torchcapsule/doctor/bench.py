"""Effects that run kernels: the per-device matmul smoke test and the --bench figures.

Both import torch inside and record what happened (never raise), so a failing GPU becomes a
fact the rules can judge. Sizes are small on the CPU: the smoke test proves the stack computes
correctly, it is not a benchmark.
"""
from __future__ import annotations

import time

from .facts import Bench, Facts, Smoke

SMOKE_N = 256
GPU_GEMM_N = 8192
CPU_GEMM_N = 512
GPU_COPY_BYTES = 1 << 30  # 1 GiB: far above any L2 cache
CPU_COPY_BYTES = 64 << 20


def _targets(facts: Facts) -> list[str]:
    if facts.cuda_available and facts.devices:
        return [f"cuda:{d.index}" for d in facts.devices]
    return ["cpu"]


def smoke(facts: Facts) -> list[Smoke]:
    """A 256x256 float32 matmul on each device, compared with a float64 CPU reference."""
    if facts.torch_version is None:
        return []
    import torch

    out = []
    for dev in _targets(facts):
        t0 = time.perf_counter()
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(SMOKE_N, SMOKE_N, generator=g)
            b = torch.randn(SMOKE_N, SMOKE_N, generator=g)
            c = (a.to(dev) @ b.to(dev)).cpu()
            if dev != "cpu":
                torch.cuda.synchronize(dev)
            ref = a.double() @ b.double()
            err = ((c.double() - ref).abs().max() / ref.abs().max()).item()
            # TF32 (on by default for cuDNN, optional for matmul) keeps ~1e-3 relative error
            ok = err < 1e-2
            out.append(Smoke(dev, ok, time.perf_counter() - t0, err,
                             None if ok else f"wrong result: max relative error {err:.2e}"))
        except Exception as e:  # a missing kernel image, an XID, an OOM: all are findings
            out.append(Smoke(dev, False, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}".strip()))
    return out


def bench(facts: Facts) -> list[Bench]:
    """bf16 GEMM TFLOP/s and copy bandwidth per GPU against the matrix's peak; float32 on the CPU."""
    if facts.torch_version is None:
        return []
    import torch

    from ..compat import load_matrix

    matrix = load_matrix()
    results = []
    for dev in _targets(facts):
        on_gpu = dev != "cpu"
        name = torch.cuda.get_device_name(dev) if on_gpu else "cpu"
        model = matrix.gpu_for_device(name) if on_gpu else None
        dtype = torch.bfloat16 if on_gpu else torch.float32
        n = GPU_GEMM_N if on_gpu else CPU_GEMM_N
        r = Bench(dev, name, str(dtype).removeprefix("torch."), n,
                  peak_tflops=model.bf16_tflops if model else None,
                  peak_gbps=model.mem_gbps if model else None)
        try:
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)
            secs = _time(lambda: a @ b, dev, iters=20 if on_gpu else 5)
            r.gemm_tflops = 2 * n**3 / secs / 1e12
            nbytes = GPU_COPY_BYTES if on_gpu else CPU_COPY_BYTES
            src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            secs = _time(lambda: dst.copy_(src), dev, iters=20 if on_gpu else 5)
            r.mem_gbps = 2 * nbytes / secs / 1e9  # a copy reads and writes every byte
        except Exception as e:
            r.error = f"{type(e).__name__}: {e}".strip()
        results.append(r)
    return results


def _time(fn, dev: str, *, iters: int) -> float:
    """Mean seconds per call after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    if dev == "cpu":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    with torch.cuda.device(dev):  # events record on the current device's stream
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
