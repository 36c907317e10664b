"""Mixed precision: bf16 autocast on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPU.

    amp = mixed_precision(info.device)          # or mode="bf16"|"fp16"|"fp32"; env CAPSULE_PRECISION
    with amp.autocast():
        loss = criterion(model(x), y)
    amp.step(loss, optimizer)                   # backward (+ unscale/step/update with a scaler)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

MODES = ("auto", "bf16", "fp16", "fp32")


def choose_mode(device_type: str, *, bf16_supported: bool, requested: str = "auto") -> str:
    """Pure: which precision to use. CPU stays fp32 under auto (CPU autocast is rarely faster)."""
    if requested not in MODES:
        raise ValueError(f"precision '{requested}' is unknown; use one of {', '.join(MODES)}")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return "fp32"


@dataclass
class Precision:
    mode: str
    device_type: str
    scaler: "torch.amp.GradScaler | None" = None

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimizer step, through the grad scaler when fp16 needs one."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


def mixed_precision(device: torch.device | str, mode: str | None = None) -> Precision:
    device = torch.device(device)
    requested = mode or os.environ.get("CAPSULE_PRECISION", "auto")
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    chosen = choose_mode(device.type, bf16_supported=bf16, requested=requested)
    scaler = torch.amp.GradScaler(device.type) if chosen == "fp16" and device.type == "cuda" else None
    return Precision(mode=chosen, device_type=device.type, scaler=scaler)
