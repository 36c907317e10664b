"""MLflow tracking of a training: the digits training with tracking on vs off, same run, and a
training while the tracking server is down (it finishes; its metrics arrive once the server is back).

    PYTHONPATH=src python benchmarks/tracking_overhead.py [--repeats 5] [--epochs 10]

The digits MLP of examples/digits trains in this process (one rank, batch 32) and logs the loss
at EVERY step through MetricsLogger (harsher than the example's once per epoch). "on" gives the
logger an embedded SQLite store, so rank 0's follower process sends every line to MLflow while it
trains; "off" gives it none. Runs alternate (on first in odd repeats). Per run: the training loop's
wall time, the time close() takes (it does not wait for the store), and the slowest step. After an
"on" run, as `capsule run` does once a job ends: the launcher's catch-up (catch_up_job) and its
time, then the follower's own end (its CPU seconds, from its log) before the next run starts, and
a check that the store has exactly one loss point per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "examples" / "digits"))
from torchcapsule._util import free_port  # noqa: E402  (after the path is set)


def train(jsonl: Path, uri: str, epochs: int) -> dict[str, float]:
    import torch
    from torch import nn

    import data
    from model import build_model, preprocess
    from torchcapsule.train import MetricsLogger, seed_everything

    seed_everything(0)
    train_set, _ = data.datasets(0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
    model = build_model(in_features=64, hidden=128, classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(preprocess(x), y) for x, y in loader]  # the same work every run: no loader noise
    t0 = time.perf_counter()
    metrics = MetricsLogger(jsonl, rank=0, tracking_uri=uri, params={"epochs": epochs})
    follower = metrics._follower.pid if metrics._follower else 0
    metrics.event("started", 0)
    steps, step = [], 0
    for _ in range(epochs):
        for x, y in batches:
            s = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            metrics.log(step, loss=loss.item())
            steps.append(time.perf_counter() - s)
    metrics.event("finished", step)
    t_loop = time.perf_counter() - t0
    metrics.close()
    t_all = time.perf_counter() - t0
    slowest = max(range(len(steps)), key=steps.__getitem__)  # where: start-up, a sync, or anywhere
    steps.sort()
    return {"loop_s": t_loop, "close_s": t_all - t_loop, "max_step_ms": steps[-1] * 1e3, "max_step_at": slowest,
            "p999_step_ms": steps[int(0.999 * (len(steps) - 1))] * 1e3,
            "p99_step_ms": steps[int(0.99 * (len(steps) - 1))] * 1e3,
            "median_step_ms": steps[len(steps) // 2] * 1e3, "steps": step, "follower_pid": follower}


def child(args) -> None:
    print(json.dumps(train(Path(args.jsonl), args.uri, args.epochs)))


def run_child(jsonl: Path, uri: str, epochs: int, env: dict) -> dict[str, float]:
    r = subprocess.run([sys.executable, __file__, "--child", "--jsonl", str(jsonl), "--uri", uri,
                        "--epochs", str(epochs)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def after_job(jsonl: Path, uri: str, res: dict) -> None:
    """What the launcher does once the job ended (catch_up_job), timed; then wait for the follower
    to end on its own (so it takes no CPU from the next run) and read its CPU time."""
    from torchcapsule.registry import tracking

    t = time.perf_counter()
    notes = tracking.catch_up(jsonl.parent, uri, stages=[jsonl.stem.removeprefix("metrics-")])
    res["catch_up_s"] = time.perf_counter() - t
    if notes:
        raise SystemExit(f"catch-up failed: {notes}")
    log = jsonl.with_name(jsonl.name.removesuffix(".jsonl") + ".tracking.log")
    deadline = time.monotonic() + 600
    while "tracking: done" not in (text := log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"the follower never ended: {text[-2000:]}")
        time.sleep(0.2)
    res["follower_cpu_s"] = float(text.split("tracking: done", 1)[1].split(" s CPU")[0].rsplit(",", 1)[1])
    points = [s for s, _ in tracking.metric_history(uri, tracking.run_id_of(jsonl), "loss")]
    if points != list(range(1, int(res["steps"]) + 1)):
        raise SystemExit(f"{jsonl}: {len(points)} loss points for {res['steps']} steps (duplicates or gaps)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--jsonl")
    ap.add_argument("--uri", default="")
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="capsule-track-bench-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "CAPSULE_TRACKING_FLUSH_TIMEOUT": "600", "MLFLOW_TRACKING_URI": ""}
    uri = f"sqlite:///{work}/store/mlflow.db"
    # warm the store once (schema migrations) so every "on" run pays only what a training pays
    warm = run_child(work / "metrics-warm.jsonl", uri, 1, env)
    after_job(work / "metrics-warm.jsonl", uri, warm)
    print(f"load average {os.getloadavg()[0]:.1f}; {warm['steps']} steps/epoch; {args.epochs} epochs; "
          f"loss logged every step", flush=True)
    results: dict[str, list[dict]] = {"on": [], "off": []}
    for i in range(args.repeats):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for mode in order:
            jsonl = work / f"metrics-{mode}-{i}.jsonl"
            res = run_child(jsonl, uri if mode == "on" else "", args.epochs, env)
            res.update(catch_up_s=0.0, follower_cpu_s=0.0)
            if mode == "on":
                after_job(jsonl, uri, res)
            results[mode].append(res)
            print(f"  repeat {i + 1} {mode:3}: loop {res['loop_s']:.2f} s, close {res['close_s']:.3f} s, "
                  f"step median {res['median_step_ms']:.2f} ms, p99 {res['p99_step_ms']:.2f} ms, "
                  f"p99.9 {res['p999_step_ms']:.2f} ms, max {res['max_step_ms']:.1f} ms at step {res['max_step_at']}; catch-up after the job {res['catch_up_s']:.2f} s, "
                  f"follower CPU {res['follower_cpu_s']:.2f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    on, off = med["on"], med["off"]
    print(f"\nmedians over {args.repeats} repeats ({on['steps']:.0f} steps each):")
    for k, unit in (("loop_s", "s"), ("close_s", "s"), ("median_step_ms", "ms"), ("p99_step_ms", "ms"),
                    ("p999_step_ms", "ms"), ("max_step_ms", "ms"), ("catch_up_s", "s"), ("follower_cpu_s", "s")):
        ratio = f"ratio {on[k] / off[k]:.3f}" if off[k] else ""
        print(f"  {k:15} off {off[k]:8.3f} {unit}   on {on[k]:8.3f} {unit}   {ratio}")
    total_on, total_off = on["loop_s"] + on["close_s"], off["loop_s"] + off["close_s"]
    print(f"  training wall time (loop + close): off {total_off:.2f} s, on {total_on:.2f} s "
          f"({100 * (total_on / total_off - 1):+.1f} %)")
    print(f"  slowest step: off {off['max_step_ms']:.1f} ms, on {on['max_step_ms']:.1f} ms "
          f"(ratio {on['max_step_ms'] / off['max_step_ms']:.2f})")

    # The server is down for the whole training: it finishes; the lines wait in the JSONL.
    port = free_port()
    server_uri = f"http://127.0.0.1:{port}"
    down = work / "metrics-down.jsonl"
    env_down = {**env, "CAPSULE_REGISTRY_PROBE_TIMEOUT": "1"}
    res = run_child(down, server_uri, args.epochs, env_down)
    from torchcapsule.registry import tracking

    log = down.with_name("metrics-down.tracking.log")
    while "tracking: done" not in (log.read_text() if log.exists() else ""):  # retries 20 s after EOF
        time.sleep(0.5)
    print(f"\nserver down: training finished, loop {res['loop_s']:.2f} s, close {res['close_s']:.3f} s; "
          f"the follower gave up {tracking.pending_bytes(down)} bytes pending in the JSONL")
    srv = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", "1", "--backend-store-uri", f"sqlite:///{work}/server.db"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(server_uri + "/health", timeout=2).close()
                break
            except OSError:
                if srv.poll() is not None:
                    raise SystemExit("mlflow server did not start")
                time.sleep(0.5)
        up = time.perf_counter() - t
        t = time.perf_counter()
        tracking.sync(down, server_uri)
        points = len(tracking.metric_history(server_uri, tracking.run_id_of(down), "loss"))
        print(f"server back (started in {up:.1f} s): sync took {time.perf_counter() - t:.2f} s, "
              f"{points} loss points for {res['steps']} steps, {tracking.pending_bytes(down)} bytes pending")
    finally:
        os.killpg(srv.pid, 15)
        srv.wait()


if __name__ == "__main__":
    main()
