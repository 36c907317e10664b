"""Train the digits MLP: DDP over torchrun (or a single process), resumable, preemptible.

    torchrun --nproc_per_node 2 train.py --epochs 30      # or: capsule run train
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from torchcapsule.train import (Checkpointer, MetricsLogger, Preemption, init_distributed,
                                mixed_precision, seed_everything, unwrap)

import data
from model import build_model, preprocess

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--name", default=os.environ.get("CAPSULE_PROJECT", "digits"), help="model name")
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model, x, y, device) -> float:
    model.eval()
    pred = model(preprocess(x).to(device)).argmax(1).cpu()
    model.train()
    return (pred == y).float().mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    print(f"rank {info.rank}/{info.world_size} ready on {info.device} (pid {os.getpid()})", flush=True)
    seed_everything(args.seed)
    train_set, test_set = data.datasets(args.seed)
    x_test, y_test = test_set.tensors

    kwargs = {"in_features": 64, "hidden": args.hidden, "classes": 10}
    model = build_model(**kwargs).to(info.device)
    ddp = DDP(model) if info.distributed else model
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=1e-4)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    amp = mixed_precision(info.device)
    ckpt = Checkpointer(model=ddp, optimizer=opt, scheduler=sched, scaler=amp.scaler, keep=args.keep)
    metrics = MetricsLogger(rank=info.rank)
    stop = Preemption()

    step = 0
    resumed = ckpt.resume(map_location=info.device)
    if resumed:  # ckpt.resumed_from: the checkpoint actually loaded (never claimed when starting at 0)
        step = resumed["step"]
        metrics.event("resumed", step, checkpoint=str(ckpt.resumed_from))
        if info.is_main:
            print(f"resumed from step {step} ({ckpt.resumed_from})", flush=True)
    else:
        metrics.event("started", 0, world_size=info.world_size, precision=amp.mode)
    if info.is_main:
        print(f"world_size={info.world_size} backend={info.backend} device={info.device} "
              f"precision={amp.mode} steps/epoch={steps_per_epoch}", flush=True)

    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    total = args.epochs * steps_per_epoch
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)  # same order as before a restart, so skipping resumes exactly
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            x, y = preprocess(x).to(info.device), y.to(info.device)
            with amp.autocast():
                loss = loss_fn(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt)
            sched.step()
            step += 1
            if stop.preempted():  # SIGTERM on any rank: save where we are and leave with 75
                ckpt.save(step)
                metrics.event("preempted", step)
                if info.is_main:
                    print(f"preempted at step {step}: checkpoint saved", flush=True)
                stop.exit()
            if step % args.ckpt_every == 0:
                ckpt.save(step)
        acc = accuracy(unwrap(ddp), x_test, y_test, info.device)
        metrics.log(step, epoch=epoch + 1, loss=round(loss.item(), 5), test_accuracy=round(acc, 5))
        if info.is_main:
            print(f"epoch {epoch + 1}/{args.epochs} step {step} loss {loss.item():.4f} "
                  f"test_accuracy {acc:.4f}", flush=True)

    acc = accuracy(unwrap(ddp), x_test, y_test, info.device)
    if info.is_main:
        out = save_model_dir(unwrap(ddp), args, kwargs, acc, step)
        print(f"saved {out} test_accuracy {acc:.4f} in {time.perf_counter() - t0:.1f}s", flush=True)
    ckpt.finish(step)  # the next `capsule run train` trains anew instead of resuming a finished run
    metrics.event("finished", step, test_accuracy=round(acc, 5))
    metrics.close()
    from torchcapsule.train import cleanup
    cleanup()


def save_model_dir(model, args, kwargs, acc: float, step: int) -> Path:
    """<models>/<name>/: model.safetensors + model.py + meta.json (the model directory contract)."""
    from safetensors.torch import save_model

    from torchcapsule.registry.facts import machine_facts, running_image

    models = Path(os.environ.get("CAPSULE_MODELS_DIR", HERE / "models"))
    out = models / args.name
    tmp = models / f".tmp-{args.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model.cpu(), str(tmp / "model.safetensors"))
    shutil.copy(HERE / "model.py", tmp / "model.py")
    meta = {
        "name": args.name, "factory": "build_model", "kwargs": kwargs,
        "input_shape": [64], "input_dtype": "float32", "labels": [str(i) for i in range(10)],
        "metrics": {"accuracy": round(acc, 5)},
        "params": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "seed": args.seed, "world_size": int(os.environ.get("WORLD_SIZE", "1"))},
        "torch": torch.__version__.split("+")[0], "step": step,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Lets `capsule serve --smoke-test` send real digits and report accuracy.
        "dataset": "sklearn.datasets.load_digits",
        # The training machine's stack, recorded where it trained (the registry keeps it).
        "machine": machine_facts(),
        # The image it trained in (by digest when pushed), or "not in the image" on the host.
        "image": running_image(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():  # replace the previous model only once the new one is complete
        old = models / f".old-{args.name}-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


if __name__ == "__main__":
    main()
