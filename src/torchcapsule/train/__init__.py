"""torchcapsule.train: a thin runtime over torch.distributed for user training scripts.

    from torchcapsule.train import (Checkpointer, MetricsLogger, Preemption, init_distributed,
                                    mixed_precision, seed_everything)

    info = init_distributed()                 # torchrun env or a single process; nccl/gloo; device
    seed_everything(0)
    amp = mixed_precision(info.device)         # bf16 / fp16+scaler / fp32
    ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, scaler=amp.scaler)
    start = (ckpt.resume() or {"step": 0})["step"]
    stop = Preemption()                        # SIGTERM -> save -> exit 75
    ...
        if stop.preempted():
            ckpt.save(step); stop.exit()
"""
from __future__ import annotations

from .amp import Precision, mixed_precision
from .checkpoint import Checkpointer, default_checkpoint_dir, unwrap
from .dist import DistInfo, barrier, cleanup, init_distributed, seed_everything
from .metrics import MetricsLogger, read_metrics
from .signals import PREEMPTED_EXIT_CODE, Preemption

__all__ = [
    "Checkpointer", "DistInfo", "MetricsLogger", "PREEMPTED_EXIT_CODE", "Precision", "Preemption",
    "barrier", "cleanup", "default_checkpoint_dir", "init_distributed", "mixed_precision",
    "read_metrics", "seed_everything", "unwrap",
]
