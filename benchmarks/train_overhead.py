"""Wall time of `capsule run train` against the bare torchrun command on the same script, same run.

    PYTHONPATH=src python benchmarks/train_overhead.py [--repeats 3] [--epochs 30]

Each repeat runs both, interleaved (capsule first on odd repeats, bare first on even ones) in one
private copy of examples/digits; every run trains from step 0 (a finished run's checkpoints are
not resumed). Prints the medians and the overhead of capsule over bare torchrun.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from torchcapsule._util import free_port  # noqa: E402  (after the path is set)


def timed(argv, cwd, env) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv[:4]}... failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--trivial-repeats", type=int, default=5,
                    help="repeats of a 2-rank script that only joins the group (the fixed cost)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="capsule-bench-"))
    proj = work / "digits"
    shutil.copytree(REPO / "examples" / "digits", proj,
                    ignore=shutil.ignore_patterns("__pycache__", "models", "logs", "data", ".pytest_cache"))
    cfg = proj / "capsule.yaml"
    cfg.write_text(cfg.read_text().replace("train.py --epochs 30", f"train.py --epochs {args.epochs}")
                   .replace("stages:\n", "stages:\n  trivial: {run: trivial.py, distributed: ddp, resources: {cpus: 2}}\n", 1))
    (proj / "trivial.py").write_text("from torchcapsule.train import init_distributed, barrier, cleanup\n"
                                     "init_distributed(); barrier(); cleanup()\n")
    pp = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "CAPSULE_HOME": str(work / "home"),
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{pp}" if pp else str(REPO / "src")}
    # The bare run gets the same volumes, threads and store setting capsule gives the ranks.
    bare_env = {**env, "CAPSULE_PROJECT": "digits", "CAPSULE_STAGE": "train",
                "CAPSULE_MODELS_DIR": str(proj / "models"), "CAPSULE_LOGS_DIR": str(proj / "logs"),
                "CAPSULE_DATA_DIR": str(proj / "data"), "OMP_NUM_THREADS": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    def compare(stage: str, script: list[str], repeats: int) -> tuple[float, float]:
        capsule = [sys.executable, "-m", "torchcapsule.cli.main", "run", stage]
        caps, bare = [], []
        for i in range(repeats):
            bare_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *script]
            order = [("capsule", capsule, env), ("bare", bare_cmd, {**bare_env, "CAPSULE_STAGE": stage})]
            for name, argv, e in (order if i % 2 == 0 else order[::-1]):
                dt = timed(argv, proj, e)
                (caps if name == "capsule" else bare).append(dt)
                print(f"{stage} repeat {i + 1} {name:8s} {dt:6.2f} s", flush=True)
        mc, mb = statistics.median(caps), statistics.median(bare)
        print(f"  -> {stage}: median bare torchrun {mb:.2f} s (min {min(bare):.2f}), capsule run {mc:.2f} s "
              f"(min {min(caps):.2f}): overhead {100 * (mc - mb) / mb:+.1f} % ({mc - mb:+.2f} s)", flush=True)
        return mc, mb

    tc, tb = compare("trivial", ["trivial.py"], args.trivial_repeats)
    mc, mb = compare("train", ["train.py", "--epochs", str(args.epochs)], args.repeats)
    print(f"\nsummary (2 CPU ranks, gloo; {args.epochs} epochs):")
    print(f"  fixed cost of capsule run (trivial job): {tc - tb:+.2f} s")
    print(f"  training: bare {mb:.2f} s, capsule {mc:.2f} s, overhead {100 * (mc - mb) / mb:+.1f} %")
    print(f"  fixed cost as a share of the bare training time: {100 * (tc - tb) / mb:+.1f} %")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
