"""Multi-node Slurm figures on the two-node cluster (scripts/slurm-multinode.sh):

  1. the digits training (CPU, gloo, 2 ranks per node) on one node vs two nodes, through
     `capsule run train --on slurm --nodes N`;
  2. capsule's launch overhead: `capsule run train --on slurm --nodes 2` against a hand-written
     `sbatch --wait` script of the same job (`srun python -m torch.distributed.run ...`), alternated
     in the same run, wall time from the command's start to its return.

    SLURM_CONF is set here; run scripts/start-services.sh first.
    .venv/bin/python benchmarks/slurm_multinode.py [--repeats 2] [--epochs 30]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = "/etc/slurm-mn/slurm.conf"
ENV = {**os.environ, "SLURM_CONF": CONF}

HAND = """#!/bin/bash
#SBATCH --job-name=digits-hand
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4096M
#SBATCH --partition=debug
#SBATCH --output={out}/hand-%j.out
#SBATCH --chdir={proj}
set -euo pipefail
export OMP_NUM_THREADS=1 CAPSULE_MODELS_DIR={proj}/models CAPSULE_LOGS_DIR={proj}/logs PYTHONUNBUFFERED=1
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun {python} -m torch.distributed.run --nnodes {nodes} --nproc_per_node 2 --rdzv_backend c10d \\
  --rdzv_endpoint "$head:29531" --rdzv_id "$SLURM_JOB_ID" train.py --epochs {epochs}
"""


def _runtime(job: str) -> float | None:
    """Slurm's own start-to-end seconds of the job (scheduling noise excluded)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=ENV)
    m = re.search(r"RunTime=(\d+):(\d+):(\d+)", r.stdout)
    return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) if m else None


def capsule_run(proj: Path, nodes: int) -> tuple[float, float | None, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "run", "train", "--on", "slurm",
                        "--nodes", str(nodes)], cwd=proj, capture_output=True, text=True, env=ENV)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"capsule run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    job = re.search(r"slurm:(\d+)", r.stderr + r.stdout)[1]
    acc = json.loads((proj / "models" / "digits" / "meta.json").read_text())["metrics"]["accuracy"]
    return wall, _runtime(job), acc


def hand_run(proj: Path, nodes: int, epochs: int) -> tuple[float, float | None, float]:
    script = proj / "hand.sbatch"
    script.write_text(HAND.format(nodes=nodes, out=proj / "logs", proj=proj, python=sys.executable, epochs=epochs))
    (proj / "logs").mkdir(exist_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True, text=True, env=ENV)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"hand-written sbatch failed: {r.stderr}")
    job = r.stdout.strip().split(";")[0]
    acc = json.loads((proj / "models" / "digits" / "meta.json").read_text())["metrics"]["accuracy"]
    return wall, _runtime(job), acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capsule-mn-bench-"))
    proj = tmp / "digits"
    shutil.copytree(REPO / "examples" / "digits", proj, ignore=shutil.ignore_patterns(".capsule", "logs", "models"))
    text = (proj / "capsule.yaml").read_text()
    (proj / "capsule.yaml").write_text(text.replace("train.py --epochs 30", f"train.py --epochs {args.epochs}"))
    rows: dict[str, list[tuple[float, float | None, float]]] = {"capsule 1 node": [], "capsule 2 nodes": [],
                                                                "hand sbatch 2 nodes": []}
    try:
        for i in range(args.repeats):  # alternated, so load drifts hit every variant alike
            rows["capsule 2 nodes"].append(capsule_run(proj, 2))
            rows["hand sbatch 2 nodes"].append(hand_run(proj, 2, args.epochs))
            rows["capsule 1 node"].append(capsule_run(proj, 1))
            print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"digits train --epochs {args.epochs}, CPU gloo, 2 ranks/node, {args.repeats} alternated repeats")
    print(f"{'variant':<22}{'wall s (median)':>16}{'Slurm RunTime s':>17}{'accuracy':>10}")
    med = {}
    for name, vals in rows.items():
        med[name] = statistics.median(v[0] for v in vals)
        rt = [v[1] for v in vals if v[1] is not None]
        print(f"{name:<22}{med[name]:>16.1f}{statistics.median(rt) if rt else float('nan'):>17.0f}"
              f"{statistics.median(v[2] for v in vals):>10.4f}   walls: {', '.join(f'{v[0]:.1f}' for v in vals)}")
    over = med["capsule 2 nodes"] - med["hand sbatch 2 nodes"]
    print(f"capsule overhead vs hand-written sbatch+srun torchrun: {over:+.1f} s "
          f"({100 * over / med['hand sbatch 2 nodes']:+.1f} %); target <= max(1 s, 3 %)")
    print(f"two nodes vs one node: {med['capsule 2 nodes'] / med['capsule 1 node']:.2f}x the wall time")


if __name__ == "__main__":
    main()
