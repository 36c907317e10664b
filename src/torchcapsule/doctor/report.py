"""Facts + Findings -> one JSON object (schema below, docs/doctor.md) or a rich text report.

JSON schema "torchcapsule.doctor/v1":
    {
      "schema": "torchcapsule.doctor/v1",
      "ok": bool,                     # no finding of severity "error"
      "exit_code": 0 | 1,
      "require_gpus": int,
      "usable_gpus": int,
      "summary": {torch, pinned_torch, torch_matches_pin, torch_cuda, cuda_available,
                  device_count, driver, cudnn, nccl, bf16, tf32, shm_bytes, in_container},
      "findings": [{"id", "severity": "error"|"warning"|"info", "message", "fix": str|null}],
      "facts": {... every field of doctor.facts.Facts ...}
    }
"""
from __future__ import annotations

from typing import Any

from .diagnose import ERROR, INFO, WARNING, Finding, exit_code, usable_gpus
from .facts import Facts

SCHEMA = "torchcapsule.doctor/v1"


def _tf32(f: Facts) -> bool | None:
    """TF32 tensor cores exist from compute capability 8.0 (Ampere) on."""
    if not f.devices:
        return None
    return all(int(d.cc.split(".")[0]) >= 8 for d in f.devices)


def _matches_pin(f: Facts) -> bool | None:
    """Installed torch == capsule.yaml's image.torch (None: no project, or no torch)."""
    pinned = (f.pinned or {}).get("torch")
    if not pinned or not f.torch_version:
        return None
    return f.torch_version.split("+")[0] == pinned


def to_json(facts: Facts, findings: list[Finding], *, require_gpus: int) -> dict[str, Any]:
    from ..compat import load_matrix

    code = exit_code(findings)
    return {
        "schema": SCHEMA,
        "ok": code == 0,
        "exit_code": code,
        "require_gpus": require_gpus,
        "usable_gpus": usable_gpus(facts, load_matrix()),
        "summary": {
            "torch": facts.torch_version,
            "pinned_torch": (facts.pinned or {}).get("torch"),
            "torch_matches_pin": _matches_pin(facts),
            "torch_cuda": facts.torch_cuda,
            "cuda_available": facts.cuda_available,
            "device_count": facts.device_count,
            "driver": facts.driver,
            "cudnn": facts.cudnn,
            "nccl": facts.nccl,
            "bf16": facts.bf16_supported,
            "tf32": _tf32(facts),
            "shm_bytes": facts.shm_bytes,
            "in_container": facts.in_container,
        },
        "findings": [x.to_dict() for x in findings],
        "facts": facts.to_dict(),
    }


_STYLE = {ERROR: "bold red", WARNING: "yellow", INFO: "cyan"}


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def render_text(console, facts: Facts, findings: list[Finding], *, require_gpus: int) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    pinned = (facts.pinned or {}).get("torch")
    torch_line = facts.torch_version or f"not importable ({facts.torch_error})"
    if pinned and facts.torch_version:
        same = facts.torch_version.split("+")[0] == pinned
        torch_line += f"  ({'matches' if same else 'differs from'} {pinned} pinned in {facts.project_file})"
    t.add_row("torch", torch_line)
    t.add_row("torch.version.cuda", facts.torch_cuda or "None (CPU-only build)")
    t.add_row("CUDA available", f"{facts.cuda_available}, {facts.device_count} device(s)")
    for d in facts.devices or facts.nvml_devices:
        mig = f", MIG {d.mig}" if d.mig else ""
        seen = "" if d.seen_by == "torch" else " (seen by NVML only)"
        t.add_row(f"  GPU {d.index}", f"{d.name}, sm_{d.cc.replace('.', '')}, {_gib(d.total_memory)}{mig}{seen}")
    if facts.arch_list:
        t.add_row("arch list", " ".join(facts.arch_list))
    t.add_row("cuDNN / NCCL", f"{facts.cudnn or '-'} / {facts.nccl or '-'}")
    drv = facts.driver or "not found"
    if facts.driver_source:
        drv += f" (from {facts.driver_source}" + (f", supports CUDA {facts.driver_cuda})" if facts.driver_cuda else ")")
    t.add_row("driver", drv)
    t.add_row("bf16 / TF32", f"{_yn(facts.bf16_supported)} / {_yn(_tf32(facts))}"
              + (f" (matmul allow_tf32={facts.tf32_matmul})" if facts.tf32_matmul is not None else ""))
    t.add_row("/dev/shm", _gib(facts.shm_bytes))
    t.add_row("container", ("yes: " + "; ".join(facts.container_evidence)) if facts.in_container else "no")
    for k, v in facts.env.items():
        if v is not None:
            t.add_row(k, repr(v))
    t.add_row("/dev/nvidia*", " ".join(facts.dev_nvidia) or "none")
    for s in facts.smoke:
        t.add_row(f"smoke {s.device}", "ok" if s.ok else f"FAILED: {s.error}")
    for b in facts.bench:
        t.add_row(f"bench {b.device}", _bench_line(b))
    console.print(t)
    console.print()
    if not findings:
        console.print("[green]ok[/]: no problems found")
    for x in findings:
        console.print(f"[{_STYLE[x.severity]}]{x.severity}[/] [bold]{x.id}[/]: {x.message}")
        if x.fix:
            console.print(f"    fix: {x.fix}")
    code = exit_code(findings)
    req = f" (--require-gpus {require_gpus})" if require_gpus else ""
    console.print(f"\n{'[green]ok[/]' if code == 0 else '[bold red]failed[/]'}{req}")


def _yn(v: bool | None) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def _bench_line(b) -> str:
    if b.error:
        return f"failed: {b.error}"
    parts = [f"{b.gemm_dtype} GEMM n={b.gemm_n}: {b.gemm_tflops:.3g} TFLOP/s"]
    if b.peak_tflops:
        parts[-1] += f" ({100 * b.gemm_tflops / b.peak_tflops:.0f}% of {b.peak_tflops:g} peak)"
    parts.append(f"copy: {b.mem_gbps:.3g} GB/s")
    if b.peak_gbps:
        parts[-1] += f" ({100 * b.mem_gbps / b.peak_gbps:.0f}% of {b.peak_gbps:g} peak)"
    return "; ".join(parts)
