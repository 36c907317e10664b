"""`capsule serve --smoke-test`: start the real service on a free port, send real requests,
check the answers, stop it with SIGTERM. The pipeline's serve stage runs this."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import json
import time
from pathlib import Path

from .._util import free_port
from ..errors import ServeError

DIGITS_DATASETS = {"sklearn.datasets.load_digits", "sklearn-digits", "sklearn:digits"}


def _argv(opts, port: int) -> list[str]:
    s = opts.settings.model_copy(update={"port": port, "reload_interval": 0.0, "log_level": "warning"})
    argv = [sys.executable, "-m", "torchcapsule.cli.main", "serve", *s.flags()]
    if opts.gpu_per_worker:
        argv[argv.index("--workers") + 1] = "gpu"
    return argv + (["-f", opts.project_file] if opts.project_file else [])


def sample_requests(meta: dict, n: int = 8) -> tuple[list[dict], list[str] | None]:
    """Requests from the model's own metadata: real sklearn digits if meta says so, else random."""
    import numpy as np

    shape = meta.get("input_shape")
    if not shape:
        return [], None
    if meta.get("dataset") in DIGITS_DATASETS and list(shape) == [64]:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        idx = np.random.default_rng(0).choice(len(X), n, replace=False)
        return [{"inputs": X[i].tolist()} for i in idx], [str(y[i]) for i in idx]
    rng = np.random.default_rng(0)
    integer = str(meta.get("input_dtype", "float32")).startswith("int")
    reqs = []
    for _ in range(n):
        x = rng.integers(0, 10, size=shape) if integer else rng.standard_normal(shape).astype("float32")
        reqs.append({"inputs": x.tolist()})
    return reqs, None


def smoke_test(opts, file: str | None = None) -> int:
    import httpx

    from rich.console import Console

    out = Console(highlight=False)
    port = free_port(opts.settings.host)
    base = f"http://{opts.settings.host}:{port}"
    proc = subprocess.Popen(_argv(opts, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=opts.base_dir or None, env={**os.environ})
    problems: list[str] = []
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            info = _wait_ready(client, proc, 120)
            model = info["models"][0]
            meta = json.loads((Path(model["path"]) / "meta.json").read_text())
            if opts.settings.handler:
                reqs, truth = _handler_examples(opts, model["path"]), None
            else:
                reqs, truth = sample_requests(meta)
            if not reqs:
                problems.append("no request to send: meta.json has no input_shape / the handler no example()")
            labels = model.get("labels") if not opts.settings.handler else None
            correct = 0
            t0 = time.perf_counter()
            for i, body in enumerate(reqs):
                r = client.post("/v1/predict", json=body)
                if r.status_code != 200:
                    problems.append(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                ans = r.json()
                if r.headers.get("x-model-version") != model["version"]:
                    problems.append(f"request {i}: x-model-version {r.headers.get('x-model-version')!r}")
                if labels:
                    if ans.get("label") not in labels or len(ans.get("scores", [])) != len(labels):
                        problems.append(f"request {i}: answer {ans} does not name one of the {len(labels)} labels")
                    elif truth and ans["label"] == truth[i]:
                        correct += 1
                elif not opts.settings.handler and "outputs" not in ans:
                    problems.append(f"request {i}: answer has no 'outputs': {ans}")
            elapsed = time.perf_counter() - t0
            bad = client.post("/v1/predict", content=b"{not json")
            if bad.status_code != 400:
                problems.append(f"malformed JSON answered {bad.status_code}, expected 400")
            metrics = client.get("/metrics").text
            if "capsule_requests_total" not in metrics:
                problems.append("/metrics has no capsule_requests_total")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            problems.append("server did not stop within 30 s of SIGTERM")
    if proc.returncode not in (0, None) and not problems:
        problems.append(f"server exited with {proc.returncode}")
    out.print(f"smoke test: {model['name']} version {model['version']} on {model['device']}, "
              f"{len(reqs)} requests in {elapsed * 1000:.0f} ms")
    if truth:
        out.print(f"  real sklearn digits: {correct}/{len(reqs)} labelled correctly")
    for p in problems:
        out.print(f"  [red]problem:[/red] {p}")
    if problems:
        raise ServeError(f"smoke test failed: {len(problems)} problem(s), first: {problems[0]}")
    out.print("  [green]ok[/green]: answers have the right labels/shape, 400 for bad JSON, metrics exported")
    return 0


def _wait_ready(client, proc, timeout: float) -> dict:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            log = proc.stdout.read() if proc.stdout else ""
            last = [l for l in log.strip().splitlines() if l.strip()][-1:] or ["no output"]
            # The server's own one-line error already names the cause and the fix: pass it on as is.
            reason = last[0].removeprefix("error: ")
            raise ServeError(f"the server exited with {proc.returncode} before it was ready: {reason}")
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return client.get("/v1/models").json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ServeError(f"the server was not ready within {timeout:.0f} s")


def _handler_examples(opts, model_path: str) -> list[dict]:
    """A custom handler's own example() request (its Request type is the user's)."""
    import msgspec

    from .handler import load_handler_class
    from ..registry.modeldir import read_model_dir

    cls = load_handler_class(opts.settings.handler, Path(opts.base_dir) if opts.base_dir else None)
    example = cls(read_model_dir(model_path)).example()
    return [msgspec.to_builtins(example)] * 4 if example is not None else []
