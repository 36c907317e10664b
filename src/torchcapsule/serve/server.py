"""Run the service: uvicorn (httptools + uvloop) in one process, or N worker processes.

SIGTERM/SIGINT: uvicorn stops accepting, lets in-flight requests finish (their batches run
to the end), then the lifespan shutdown drains the batcher. With workers, the parent binds
the socket once, starts N spawned children that share it, and forwards SIGTERM to them.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import Serve
from ..errors import ServeError

log = logging.getLogger("torchcapsule.serve")


@dataclass(frozen=True)
class ServerOptions:
    """A resolved `capsule serve`: its settings (config.Serve, the one definition, with the model
    and reload_interval resolved) and what the CLI found around them."""

    settings: Serve
    base_dir: str | None = None  # where relative model/handler paths are taken from
    project_file: str | None = None  # capsule.yaml (its registry.tracking_uri for models:/ URIs)
    gpu_per_worker: bool = False  # worker i uses cuda:i (--workers gpu)


def build_app(opts: ServerOptions, device_spec: str | None = None):
    from .app import ServeApp
    from .handler import load_handler_class
    from .reload import make_source, resolve_device

    base = Path(opts.base_dir) if opts.base_dir else None
    s = opts.settings
    source = make_source(s.model, base_dir=base, cache_dir=(base or Path.cwd()) / ".capsule" / "serve-cache",
                         project_file=Path(opts.project_file) if opts.project_file else None)
    handler_cls = load_handler_class(s.handler, base)
    device = resolve_device(device_spec or s.device)
    return ServeApp(source, handler_cls, device, s)


def run_one(opts: ServerOptions, sock: socket.socket | None = None, device_spec: str | None = None) -> None:
    """Serve in this process until SIGTERM/SIGINT; raises ServeError if no version could load."""
    import uvicorn

    s = opts.settings
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.threads > 0:
        import torch

        torch.set_num_threads(s.threads)
    from .protocol import limited_protocol

    app = build_app(opts, device_spec)
    config = uvicorn.Config(
        app, host=s.host, port=s.port, loop="uvloop", http=limited_protocol(gate=app.screen), lifespan="on",
        access_log=False, log_level=s.log_level, timeout_graceful_shutdown=s.timeout_s + 5, timeout_keep_alive=30,
    )
    server = draining_server(config, app)

    def fatal(why: str) -> None:
        server.should_exit = True

    app.on_fatal = fatal
    # uvicorn re-raises SIGTERM after its graceful shutdown; a drained, clean stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock] if sock is not None else None)
    if app.failed:
        raise ServeError(f"could not serve {s.model}: {app.failed}")
    if not server.started:
        raise ServeError(f"could not listen on {s.host}:{s.port}",
                         hint="is the port in use? pick another with --port")


# How long, after SIGTERM, the service keeps reading requests that clients already sent before
# uvicorn stops accepting: an inline forward holds the event loop, so such requests can sit
# unread in socket buffers or the accept backlog; closing at once would reset them.
DRAIN_GRACE_S = 0.5


def draining_server(config, app):
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.draining = True  # /readyz answers 503 from now on
            loop = asyncio.get_running_loop()
            end = loop.time() + DRAIN_GRACE_S
            hard_end = end + app.settings.timeout_s  # busy keep-alive clients cannot hold it open
            while loop.time() < end or (app.batcher.depth and loop.time() < hard_end):
                await asyncio.sleep(0.02)
            await super().shutdown(sockets)

    return Server(config)


def _worker(opts: ServerOptions, sock: socket.socket, index: int) -> None:
    device = f"cuda:{index}" if opts.gpu_per_worker else None
    try:
        run_one(opts, sock, device)
    except ServeError as e:
        print(f"error: worker {index}: {e}", file=sys.stderr)
        sys.exit(EXIT_CANNOT_SERVE)


def run_workers(opts: ServerOptions) -> None:
    """N processes on one listening socket (the kernel spreads connections between them)."""
    s = opts.settings
    sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.host, s.port))
    except OSError as e:
        raise ServeError(f"--port {s.port}: cannot listen on {s.host}: {e.strerror}",
                         hint="pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    try:
        _supervise(opts, sock)
    finally:
        sock.close()


# A worker that dies (OOM kill, segfault) is started again this many times; past that, or when
# a worker cannot serve at all (its model does not load: EXIT_CANNOT_SERVE, the same for every
# worker), the service stops as a whole, so an orchestrator sees it down rather than half-serving.
MAX_WORKER_RESTARTS = 3
EXIT_CANNOT_SERVE = 3


def _supervise(opts: ServerOptions, sock: socket.socket) -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # no fork after torch/threads exist

    def start(i: int):
        p = ctx.Process(target=_worker, args=(opts, sock, i), name=f"capsule-serve-{i}")
        p.start()
        return p

    procs = {i: start(i) for i in range(opts.settings.workers)}
    restarts = dict.fromkeys(procs, 0)
    state = {"stopping": False}
    gave_up: list[str] = []

    def stop_all(*_):
        state["stopping"] = True
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    while procs:
        by_sentinel = {p.sentinel: i for i, p in procs.items()}
        for s in wait(list(by_sentinel)):
            i = by_sentinel[s]
            p = procs.pop(i)
            p.join()
            if p.exitcode == 0:
                continue
            if state["stopping"]:
                gave_up += [f"worker {i} exited with code {p.exitcode}"] if p.exitcode not in (None, -signal.SIGTERM) else []
                continue
            if p.exitcode == EXIT_CANNOT_SERVE:
                gave_up.append(f"worker {i} could not serve")
                stop_all()
            elif restarts[i] < MAX_WORKER_RESTARTS:
                restarts[i] += 1
                log.error("worker %d (pid %d) exited with code %s; starting it again (%d/%d)",
                          i, p.pid, p.exitcode, restarts[i], MAX_WORKER_RESTARTS)
                procs[i] = start(i)
            else:
                gave_up.append(f"worker {i} exited with code {p.exitcode} {MAX_WORKER_RESTARTS + 1} times")
                log.error("%s; stopping the service", gave_up[-1])
                stop_all()
    if gave_up:
        raise ServeError(f"{'; '.join(gave_up)} (see above)")


def serve(opts: ServerOptions) -> None:
    if opts.settings.workers > 1:
        run_workers(opts)
    else:
        run_one(opts)
