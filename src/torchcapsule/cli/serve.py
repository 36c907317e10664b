"""`capsule serve [MODEL]`: the batched HTTP inference service (or its --smoke-test)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from ._common import file_option


def _project_or_none(file: str | None):
    """capsule.yaml if there is one (its errors are reported); None when there is none."""
    from ..config import find_project_file, load_project

    if not file:
        try:
            find_project_file(None)
        except ConfigError:
            return None  # no capsule.yaml here: MODEL on the command line is enough
    return load_project(file)


@click.command("serve")
@click.argument("model", required=False)
@file_option
@click.option("--handler", default=None, help="Custom handler FILE.py:Class (default: capsule.yaml serve.handler, "
              "else the built-in handler that reads meta.json).")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default 8080; 0 = any free port).")
@click.option("--workers", default=None, metavar="N|gpu",
              help="Worker processes sharing the port; 'gpu' = one per visible GPU, each on its own.")
@click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N.")
@click.option("--max-batch-size", type=click.IntRange(1, 4096), default=None, help="Requests per batch (32).")
@click.option("--max-wait-ms", type=click.FloatRange(0, 10_000), default=None,
              help="Longest a batch keeps collecting while requests keep arriving (2 ms).")
@click.option("--max-queue", type=click.IntRange(1), default=None, help="Queued requests before 503 (256).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=None,
              help="Per-request timeout in seconds, answered 504 (10).")
@click.option("--max-body-bytes", type=click.IntRange(1), default=None, help="Larger bodies get 413 (1 MiB).")
@click.option("--reload-interval", type=click.FloatRange(0), default=None, metavar="S",
              help="Check the alias/directory for a new version every S seconds (0 = never; default 30 "
                   "for models:/NAME@ALIAS and for symlinks, else 0).")
@click.option("--threads", type=click.IntRange(0), default=0, help="torch intra-op threads (0 = torch default).")
@click.option("--forward-thread", is_flag=True, help="Run forwards in a worker thread instead of the event loop.")
@click.option("--smoke-test", is_flag=True, help="Start on a free port, send real requests, check the answers, stop.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def serve(model, file, handler, host, port, workers, device, max_batch_size, max_wait_ms, max_queue, timeout_s,
          max_body_bytes, reload_interval, threads, forward_thread, smoke_test, log_level):
    """Serve MODEL (models:/NAME@ALIAS, models:/NAME/VERSION or a model directory) over HTTP
    with dynamic batching, probes (/healthz, /readyz), /metrics, /v1/models and hot reload."""
    from ..config import Serve
    from ..serve.app import ServeSettings
    from ..serve.server import ServerOptions, serve as run

    project = _project_or_none(file)
    cfg = project.serve if project is not None and getattr(project, "serve", None) is not None else Serve()
    base_dir = str(_project_root(project)) if project is not None else None
    project_file = None
    if project is not None:
        from ..config import find_project_file

        project_file = str(find_project_file(file))
    if model:
        base_dir_model = None  # a MODEL on the command line is relative to the current directory
    else:
        model = cfg.model
        base_dir_model = base_dir
        if not model:
            raise ConfigError("no MODEL given and capsule.yaml has no serve.model",
                              hint="pass models:/NAME@ALIAS, models:/NAME/VERSION or a directory")
    if not model.startswith("models:/"):
        model = str(Path(base_dir_model or ".", model).absolute()) if not Path(model).is_absolute() else model

    n_workers, gpu_per_worker = _parse_workers(workers, cfg.workers)
    if reload_interval is None:
        reload_interval = cfg.reload_interval
    if reload_interval is None:
        reload_interval = 30.0 if (model.startswith("models:/") and "@" in model) or Path(model).is_symlink() else 0.0
    settings = ServeSettings(
        max_batch_size=max_batch_size or cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms if max_wait_ms is None else max_wait_ms,
        max_queue=max_queue or cfg.max_queue,
        timeout_s=timeout_s or cfg.timeout_s,
        max_body_bytes=max_body_bytes or cfg.max_body_bytes,
        reload_interval=reload_interval,
        in_thread=forward_thread,
    )
    opts = ServerOptions(
        model=model, handler=handler or cfg.handler, base_dir=base_dir, project_file=project_file,
        host=host or cfg.host, port=cfg.port if port is None else port,
        device=device or cfg.device, workers=n_workers, gpu_per_worker=gpu_per_worker,
        threads=threads, log_level=log_level, settings=settings,
    )
    if smoke_test:
        from ..serve.smoke import smoke_test as smoke

        return smoke(opts, file=file)
    run(opts)
    return 0


def _project_root(project) -> Path:
    return Path(project.root)


def _parse_workers(value: str | None, default: int) -> tuple[int, bool]:
    if value is None:
        return default, False
    if value == "gpu":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--workers gpu: no CUDA device is visible", hint="use --workers N on a CPU machine")
        return n, True
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--workers {value!r}: expected a positive number or 'gpu'")
    return n, False
