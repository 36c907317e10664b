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


def _kind(info) -> dict:
    """The click type of a config.Serve field, from its annotation and bounds (ge/gt/le)."""
    import typing

    ann = info.annotation
    if typing.get_origin(ann) is typing.Literal:
        return {"type": click.Choice(typing.get_args(ann))}
    ann = next(a for a in (*typing.get_args(ann), ann) if a is not type(None))  # X | None -> X
    limits = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if hasattr(m, k)}
    bounds = {"min": limits.get("ge", limits.get("gt")), "max": limits.get("le"), "min_open": "gt" in limits}
    kinds = {bool: {"is_flag": True}, int: {"type": click.IntRange(**bounds)}}
    return kinds.get(ann) or {"type": click.FloatRange(**bounds) if ann is float else str}


def _setting_options(command):
    """One option per config.Serve field (MODEL is the argument): type, bounds, default and help
    come from the field, so `capsule serve --help` shows capsule.yaml's defaults."""
    from ..config import Serve

    for name, info in reversed(Serve.model_fields.items()):
        if name == "model":
            continue
        kind = {"type": str, "metavar": "N|gpu"} if name == "workers" else _kind(info)
        default = "" if info.default is None or info.default is False else f"; default: {info.default}"
        command = click.option(Serve.flag(name), name, default=None, **kind,
                               help=f"{info.description} (capsule.yaml serve.{name}{default})")(command)
    return command


@click.command("serve")
@click.argument("model", required=False)
@file_option
@_setting_options
@click.option("--smoke-test", is_flag=True, help="Start on a free port, send real requests, check the answers, stop.")
def serve(model, file, smoke_test, **flags):
    """Serve MODEL (models:/NAME@ALIAS, models:/NAME/VERSION or a model directory) over HTTP
    with dynamic batching, probes (/healthz, /readyz), /metrics, /v1/models and hot reload."""
    from ..serve.server import serve as run

    project = _project_or_none(file)
    opts = server_options(project, file, model, flags)
    if smoke_test:
        from ..serve.smoke import smoke_test as smoke

        return smoke(opts, file=file)
    run(opts)
    return 0


def server_options(project, file: str | None, model: str | None, flags: dict):
    """capsule.yaml `serve:` with the flags given on top (a flag overrides yaml), MODEL made absolute
    and the reload interval decided: what the server runs with."""
    from ..config import Serve, find_project_file
    from ..serve.server import ServerOptions

    cfg = project.serve if project is not None and project.serve is not None else Serve()
    base_dir = str(Path(project.root)) if project is not None else None
    if not model:  # serve.model is relative to capsule.yaml, MODEL on the command line to the cwd
        model = cfg.model
        if not model:
            raise ConfigError("no MODEL given and capsule.yaml has no serve.model",
                              hint="pass models:/NAME@ALIAS, models:/NAME/VERSION or a directory")
        if not model.startswith("models:/"):
            model = str(Path(base_dir or ".", model).absolute())
    elif not model.startswith("models:/"):
        model = str(Path(model).absolute())
    given = {k: v for k, v in flags.items() if v is not None}
    workers, gpu_per_worker = _parse_workers(given.pop("workers", None), cfg.workers)
    settings = cfg.model_copy(update={**given, "model": model, "workers": workers})
    if settings.reload_interval is None:
        auto = (model.startswith("models:/") and "@" in model) or Path(model).is_symlink()
        settings = settings.model_copy(update={"reload_interval": 30.0 if auto else 0.0})
    return ServerOptions(settings=settings, base_dir=base_dir, gpu_per_worker=gpu_per_worker,
                         project_file=str(find_project_file(file)) if project is not None else None)


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
