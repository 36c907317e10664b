"""Checkpoint save/load throughput: torchcapsule's Checkpointer against plain torch.save/torch.load
of the same state (model + AdamW state), in the same run.

    PYTHONPATH=src python benchmarks/checkpoint_io.py [--params-m 20] [--repeats 3]

Checkpointer.save writes safetensors + a weights_only state file into a temporary directory,
fsyncs and renames it; the peers are torch.save to one file without fsync (what most scripts do)
with an fsync, and with fsync into a new file renamed over the old one (the same atomicity). Loads: Checkpointer.load (safetensors + weights_only)
against torch.load(weights_only=True). Figures include the page cache, as real saves do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from torchcapsule.train import Checkpointer


def build(params_m: float):
    width = 2048
    layers = max(1, int(params_m * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # materialise exp_avg / exp_avg_sq
    return model, opt


def nbytes(model, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for st in opt.state_dict()["state"].values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=float, default=20, help="model size in millions of parameters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, opt = build(args.params_m)
    size = nbytes(model, opt)
    work = Path(args.dir or tempfile.mkdtemp(prefix="capsule-ckpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(work / "ck", model=model, optimizer=opt, keep=1)
    plain = work / "plain.pt"

    def plain_save(fsync: bool):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, plain)
        if fsync:
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def plain_atomic(i: int):
        # the same atomicity by hand: a new file, fsync, rename over the old one
        tmp = work / f"plain.pt.tmp{i}"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, work / "atomic.pt")

    results: dict[str, list[float]] = {k: [] for k in ("capsule save", "torch.save", "torch.save+fsync",
                                                      "torch.save atomic",
                                                      "capsule load", "torch.load")}
    for i in range(args.repeats):
        t = time.perf_counter(); path = ck.save(i + 1); results["capsule save"].append(time.perf_counter() - t)
        t = time.perf_counter(); plain_save(False); results["torch.save"].append(time.perf_counter() - t)
        t = time.perf_counter(); plain_save(True); results["torch.save+fsync"].append(time.perf_counter() - t)
        t = time.perf_counter(); plain_atomic(i); results["torch.save atomic"].append(time.perf_counter() - t)
        t = time.perf_counter(); ck.load(path); results["capsule load"].append(time.perf_counter() - t)
        t = time.perf_counter(); torch.load(plain, weights_only=True); results["torch.load"].append(time.perf_counter() - t)
    mb = size / 1e6
    print(f"state: {args.params_m:g}M params + AdamW moments = {mb:.0f} MB; {args.repeats} repeats, median")
    for name, times in results.items():
        m = statistics.median(times)
        print(f"  {name:18s} {m * 1000:8.0f} ms   {mb / m:8.0f} MB/s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
