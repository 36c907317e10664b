"""Benchmark `capsule serve` against its peers, in one run, with the same load generator.

    python benchmarks/serve/bench.py [--duration 10] [--runs 3] [--concurrency 1 32] [--json out.json]

Models: the digits example model (examples/digits/models/digits if the train stage wrote it,
else a 64-64-10 MLP trained here on sklearn's digits) and a 64-512-512-10 MLP.
Servers, each on 127.0.0.1 on the same uvicorn stack (httptools + uvloop), one torch thread:
  capsule      `capsule serve DIR` (max_batch_size 32, max_wait_ms 2)
  capsule-thread  the same with --forward-thread (not in the default list; --servers to add it)
  litserve-1   LitServe, max_batch_size 1
  litserve-32  LitServe, max_batch_size 32 (batch_timeout 2 ms)
  fastapi      a plain FastAPI endpoint: pydantic request/response, one forward per request
  floor        the HTTP floor: a bare ASGI app that parses the same JSON body, returns a constant
Load: wrk -t1 -cC -dDs --latency with the same POST body (post.lua), after a 2 s warm-up.
All servers run at once and the runs are interleaved (run 1 of each server, then run 2, ...).
Also measured in the same run: the raw in-process forward throughput at batch 1 and 32.
Prints one table (median of the runs, [min-max] range) and the targets from the issue.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))
from torchcapsule._util import free_port  # noqa: E402  (after the path is set)
LUA = HERE / "post.lua"


def prepare_models(tmp: Path) -> dict[str, Path]:
    from torchcapsule.serve.testing import write_mlp_dir

    example = REPO / "examples" / "digits" / "models" / "digits"
    if (example / "meta.json").is_file():
        digits = example
    else:
        digits = write_mlp_dir(tmp / "digits", (64, 64, 10), name="digits", train_digits=True)
    mlp = write_mlp_dir(tmp / "mlp", (64, 512, 512, 10), name="mlp")
    return {"digits": digits, "mlp": mlp}


def raw_forward(model_dir: Path, batch: int, seconds: float = 2.0) -> float:
    """Samples/s of the bare module under inference_mode, one torch thread, no server."""
    code = f"""
import time, torch
torch.set_num_threads(1)
from torchcapsule.registry.modeldir import read_model_dir
from torchcapsule.serve.loader import build_module
m = build_module(read_model_dir({str(model_dir)!r}), torch.device('cpu'))
x = torch.rand({batch}, *read_model_dir({str(model_dir)!r}).input_shape)
with torch.inference_mode():
    for _ in range(50): m(x)
    n = 0; t0 = time.perf_counter()
    while time.perf_counter() - t0 < {seconds}:
        m(x); n += 1
    print(n * {batch} / (time.perf_counter() - t0))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True)
    return float(r.stdout.strip())


def server_cmd(kind: str, model_dir: Path | None, port: int) -> list[str]:
    py = sys.executable
    if kind in ("capsule", "capsule-thread"):
        return [py, "-m", "torchcapsule.cli.main", "serve", str(model_dir), "--port", str(port), "--threads", "1",
                "--max-batch-size", "32", "--max-wait-ms", "2", "--max-queue", "1024", "--reload-interval", "0",
                "--log-level", "warning"] + (["--forward-thread"] if kind == "capsule-thread" else [])
    if kind.startswith("litserve-"):
        return [py, str(HERE / "peers.py"), "litserve", str(model_dir), str(port), kind.split("-")[1]]
    if kind == "fastapi":
        return [py, str(HERE / "peers.py"), "fastapi", str(model_dir), str(port)]
    if kind == "floor":
        return [py, str(HERE / "peers.py"), "floor", "-", str(port)]
    raise ValueError(kind)


class Running:
    def __init__(self, kind: str, model_dir: Path | None, log: Path, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/predict"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = log.open("w")
        # its own session, so LitServe's worker processes stop with it
        self.proc = subprocess.Popen([*server_cmd(kind, model_dir, self.port), *extra], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready(kind, log)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, kind: str, log: Path) -> None:
        body = json.loads(re.search(r"wrk.body = '(.*)'", LUA.read_text()).group(1))
        end = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.post(self.url, json=body, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{kind} did not answer within 120 s; see {log}")
            time.sleep(0.3)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.log.close()


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, conns: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(LUA), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    agg = {}
    for k in ("rps", "p50_ms", "p99_ms"):
        vals = [r[k] for r in runs]
        agg[k] = statistics.median(vals)
        agg[k + "_range"] = (min(vals), max(vals))
    agg["errors"] = sum(r["errors"] for r in runs)
    agg["runs"] = runs
    return agg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--servers", nargs="+", default=["capsule", "litserve-1", "litserve-32", "fastapi"])
    ap.add_argument("--models", nargs="+", default=["digits", "mlp"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capsule-bench-"))
    models = prepare_models(tmp)
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start; "
          f"wrk -t1, {args.duration} s x {args.runs} runs, 2 s warm-up", flush=True)

    results: dict = {"raw_forward": {}, "http": {}}
    for name in args.models:
        for b in (1, 32):
            sps = raw_forward(models[name], b)
            results["raw_forward"][f"{name}@{b}"] = sps
            print(f"raw forward {name} batch {b}: {sps:,.0f} samples/s", flush=True)

    # All servers run at once and the runs are interleaved (run 1 of every server, then run 2,
    # in a rotated order): on a shared machine the background load drifts over minutes, and
    # this spreads the drift over all servers instead of handing it to whichever ran last.
    plan = [("floor", None)] + [(s, m) for m in args.models for s in args.servers]
    servers: dict[str, Running] = {}
    try:
        for kind, model in plan:
            label = kind if model is None else f"{model}/{kind}"
            servers[label] = Running(kind, models[model] if model else None, tmp / f"{label.replace('/', '-')}.log")
        for label, server in servers.items():
            for c in args.concurrency:
                wrk(server.url, c, 2)  # warm-up
        raw: dict[str, list] = {}
        labels = list(servers)
        for run in range(args.runs):
            order = labels[run % len(labels):] + labels[:run % len(labels)]
            for label in order:
                for c in args.concurrency:
                    r = wrk(servers[label].url, c, args.duration)
                    raw.setdefault(f"{label}@c{c}", []).append(r)
                    print(f"run {run + 1} {label:22s} c={c:<3d} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                          f"p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for key in [f"{l}@c{c}" for l in labels for c in args.concurrency]:
        results["http"][key] = summarize(raw[key])
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print(table(results, args))
    print()
    print(verdict(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict, args) -> str:
    rows = ["| server | model | conc. | req/s (median) | req/s range | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|"]
    for key, a in results["http"].items():
        label, c = key.rsplit("@c", 1)
        model, _, kind = label.rpartition("/")
        rows.append(f"| {kind} | {model or '-'} | {c} | {a['rps']:,.0f} | {a['rps_range'][0]:,.0f}-"
                    f"{a['rps_range'][1]:,.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['errors']} |")
    rows.append("")
    rows.append("| raw forward (no server, 1 thread) | samples/s |")
    rows.append("|---|---|")
    for k, v in results["raw_forward"].items():
        rows.append(f"| {k.replace('@', ' batch ')} | {v:,.0f} |")
    return "\n".join(rows)


def verdict(results: dict, args) -> str:
    http = results["http"]
    lines = []
    floor = http.get("floor@c32")
    for m in args.models:
        cap, ls1, ls32, fa = (http.get(f"{m}/{k}@c32") for k in ("capsule", "litserve-1", "litserve-32", "fastapi"))
        if cap and (ls1 or ls32):
            best_ls = max(x["rps"] for x in (ls1, ls32) if x)
            lines.append(f"{m} c=32: capsule {cap['rps']:,.0f} req/s = {cap['rps'] / best_ls:.1f}x best LitServe "
                         f"(target >= 3x) {'OK' if cap['rps'] >= 3 * best_ls else 'MISSED'}")
        if cap:
            lines.append(f"{m} c=32: capsule p99 {cap['p99_ms']:.1f} ms (target < 20) "
                         f"{'OK' if cap['p99_ms'] < 20 else 'MISSED'}")
        if cap and floor:
            lines.append(f"{m} c=32: capsule = {cap['rps'] / floor['rps']:.0%} of the HTTP floor "
                         f"{floor['rps']:,.0f} (target >= 40%) {'OK' if cap['rps'] >= 0.4 * floor['rps'] else 'MISSED'}")
        c1, f1 = http.get(f"{m}/capsule@c1"), http.get(f"{m}/fastapi@c1")
        if c1 and f1:
            d = c1["p50_ms"] - f1["p50_ms"]
            lines.append(f"{m} c=1: capsule p50 {c1['p50_ms']:.2f} ms vs plain FastAPI {f1['p50_ms']:.2f} ms "
                         f"(target: within 1 ms) {'OK' if d <= 1.0 else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
