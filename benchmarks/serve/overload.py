"""Overload: `capsule serve` with a small queue under 256 connections (issue 14 item 6).

    python benchmarks/serve/overload.py [--duration 10] [--runs 2] [--queue 8]

One digits server with `--max-queue Q` (small) and one with the default queue (256), both on
127.0.0.1, one torch thread. Each run, per server: wrk -t2 -c256 -dDs --timeout 5s (the load the
issue reported), while a probe client sends one request at a time and times each answer by its
status. Then wrk -t1 -c32 (not overloaded) for the normal latency of an accepted request.
Prints goodput (200s/s), 503s/s, timeouts, and the 503's own latency: as the probe saw it (from
sending to the answer, on a connection the server has accepted; a 503 closes the connection and
the probe's wait to be accepted again is shown apart, "reconnect") and inside the server
(capsule_request_duration_seconds for 503, from /metrics: from the parsed head to the written
answer). A full queue must answer 503 at once, and the accepted requests keep their normal
latency.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LUA, Running, prepare_models  # noqa: E402  (the serve benchmark's servers)


def wrk_counts(url: str, conns: int, threads: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                          "-s", str(LUA), url], capture_output=True, text=True, timeout=seconds + 60).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rejected = int(non2xx.group(1)) if non2xx else 0
    timeouts = int(sock.group(4)) if sock else 0
    p99 = re.search(r"\s99%\s+(\S+)", out).group(1)
    return {"ok_per_s": (total - rejected) / seconds, "rejected_per_s": rejected / seconds,
            "timeouts": timeouts, "p99_all": p99}


def probe(url: str, body: dict, stop: threading.Event, out: dict) -> None:
    """One request at a time; latency in ms per status code, each timed on a connection the
    server has accepted. A 503 closes the connection: the probe then connects again and sends
    GET /healthz first, timed apart ("reconnect": mostly the wait to be accepted, behind the
    other refused clients that reconnect too)."""
    health = url.replace("/v1/predict", "/healthz")
    with httpx.Client(timeout=10) as c:
        closed = False
        while not stop.is_set():
            if closed:
                t0 = time.perf_counter()
                try:
                    c.get(health)
                    out.setdefault("reconnect", []).append((time.perf_counter() - t0) * 1e3)
                except httpx.TransportError:
                    out.setdefault("error", []).append(float("nan"))
            t0 = time.perf_counter()
            try:
                r = c.post(url, json=body)
                code, closed = r.status_code, r.headers.get("connection") == "close"
            except httpx.TransportError:
                code, closed = "error", True
            out.setdefault(code, []).append((time.perf_counter() - t0) * 1e3)


def server_503(url: str) -> tuple[float, float]:
    """(count, seconds) of the 503s the server answered, from its /metrics."""
    text = httpx.get(url.replace("/v1/predict", "/metrics"), timeout=30).text
    got = {}
    for line in text.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f'capsule_request_duration_seconds_{key}{{status="503"}}'):
                got[key] = float(line.split()[-1])
    return got.get("count", 0.0), got.get("sum", 0.0)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--queue", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capsule-overload-"))
    model = prepare_models(tmp)["digits"]
    body = json.loads(re.search(r"wrk.body = '(.*)'", LUA.read_text()).group(1))
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    servers = {f"queue {args.queue}": Running("capsule", model, tmp / "small.log", extra=["--max-queue", str(args.queue)]),
               "queue 256": Running("capsule", model, tmp / "default.log", extra=["--max-queue", "256"])}
    rows = []
    try:
        for run in range(args.runs):
            for label, s in servers.items():
                seen: dict = {}
                stop = threading.Event()
                t = threading.Thread(target=probe, args=(s.url, body, stop, seen))
                n0, s0 = server_503(s.url)
                t.start()
                r = wrk_counts(s.url, 256, 2, args.duration)
                stop.set()
                t.join()
                n1, s1 = server_503(s.url)
                calm = wrk_counts(s.url, 32, 1, args.duration)
                row = {"server": label, "run": run + 1, **r, "calm_ok_per_s": calm["ok_per_s"],
                       "probe_200_p50": pct(seen.get(200, []), 0.5), "probe_200_p99": pct(seen.get(200, []), 0.99),
                       "probe_503_n": len(seen.get(503, [])), "probe_503_p50": pct(seen.get(503, []), 0.5),
                       "probe_503_max": max(seen.get(503, [float("nan")])), "probe_errors": len(seen.get("error", [])),
                       "reconnect_p50": pct(seen.get("reconnect", []), 0.5),
                       "reconnect_max": max(seen.get("reconnect", [float("nan")])),
                       "server_503_mean_us": (s1 - s0) / (n1 - n0) * 1e6 if n1 > n0 else float("nan")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| server | c=256 goodput (200/s) | 503/s | timeouts | probe 200 p50 / p99 ms | probe 503 n, p50 / max ms "
          "| server 503 mean us | probe reconnect p50 / max ms | c=32 goodput |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in servers:
        rs = [r for r in rows if r["server"] == label]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {label} | {med('ok_per_s'):,.0f} | {med('rejected_per_s'):,.0f} | {sum(r['timeouts'] for r in rs)} | "
              f"{med('probe_200_p50'):.1f} / {med('probe_200_p99'):.1f} | {sum(r['probe_503_n'] for r in rs)}, "
              f"{med('probe_503_p50'):.2f} / {max(r['probe_503_max'] for r in rs):.1f} | "
              f"{med('server_503_mean_us'):.0f} | {med('reconnect_p50'):.1f} / {max(r['reconnect_max'] for r in rs):.1f} | "
              f"{med('calm_ok_per_s'):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
