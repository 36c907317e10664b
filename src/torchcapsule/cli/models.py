"""`capsule models`: register, promote, list, show and pull model versions (MLflow registry).

Nothing heavy at import: torchcapsule.registry loads mlflow only when a command runs."""
from __future__ import annotations

import os
from typing import Any

import click

from ..errors import CapsuleError, ConfigError
from ._common import console, file_option, json_option, load, print_json

tracking_option = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow tracking/registry URI (default: registry.tracking_uri, $MLFLOW_TRACKING_URI, "
         "or the project's .capsule/mlflow.db).",
)


def _store(file: str | None, uri: str | None) -> tuple[Any, str]:
    """(project or None, tracking URI): --tracking-uri, else the project's, else $MLFLOW_TRACKING_URI."""
    from ..config import find_project_file
    from ..registry.store import tracking_uri

    project = None
    if file is not None:
        project = load(file)
    elif uri is None:
        try:
            found = find_project_file()
        except ConfigError:  # no capsule.yaml: fine when $MLFLOW_TRACKING_URI names the store
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                raise
            found = None
        project = load(str(found)) if found else None  # a broken capsule.yaml is still an error
    return project, uri or tracking_uri(project)


@click.group()
def models() -> None:
    """Register, promote, list, show and pull model versions."""


@models.command()
@file_option
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help="Trained model directory (default: <models volume>/<registry.model_name>).")
@click.option("--promote/--no-promote", default=True, show_default=True,
              help="Apply registry.promote.rule after registering.")
@json_option
def register(file: str | None, model_dir: str | None, promote: bool, as_json: bool) -> None:
    """Log the trained model as a new version of registry.model_name."""
    from .. import registry

    project = load(file)
    if project.registry.promote.rule:  # a bad rule fails before anything is written
        from ..registry.rules import parse_rule

        parse_rule(project.registry.promote.rule)
    mv = registry.register(project, model_dir)
    decision = registry.apply_rule(project, mv.version) if promote else None
    _report_to_pipeline(mv, decision)
    if as_json:
        out = mv.to_dict()
        out["promotion"] = None if decision is None else {
            "promoted": decision.promoted, "alias": decision.alias, "reason": decision.reason}
        print_json(out)
        return
    c = console()
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in mv.metrics.items())
    c.print(f"[green]registered[/] {mv.name} version {mv.version} ({mv.uri}){'; ' + metrics if metrics else ''}")
    if decision is not None:
        colour = "green" if decision.promoted else "yellow"
        c.print(f"[{colour}]{'promoted' if decision.promoted else 'not promoted'}[/]: {decision.reason}")


@models.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default=None, help="Alias to set (default: registry.promote.alias, else champion).")
@file_option
@tracking_option
@json_option
def promote(name: str, version: str, alias: str | None, file: str | None, tracking_uri: str | None,
            as_json: bool) -> None:
    """Point ALIAS at VERSION of NAME (no rule: an explicit decision)."""
    from .. import registry

    project, uri = _store(file, tracking_uri)
    alias = alias or (project.registry.promote.alias if project else "champion")
    mv = registry.promote(name, version, alias, tracking_uri=uri)
    if as_json:
        print_json(mv.to_dict())
        return
    console().print(f"[green]promoted[/] {name} version {mv.version} to {alias} (models:/{name}@{alias})")


@models.command("list")
@click.argument("name", required=False)
@file_option
@tracking_option
@json_option
def list_(name: str | None, file: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """List registered models, or the versions of NAME."""
    from .. import registry

    _, uri = _store(file, tracking_uri)
    if name is None:
        rows = registry.list_models(tracking_uri=uri)
        if as_json:
            print_json(rows)
            return
        table = _table("model", "latest", "aliases", "updated")
        for r in rows:
            aliases = ", ".join(f"{a}->v{v}" for a, v in r["aliases"].items())
            table.add_row(r["name"], r["latest_version"] or "-", aliases or "-", (r["updated_at"] or "")[:19])
        _show(table, empty=f"no registered models in {uri}" if not rows else None)
        return
    versions = registry.list_versions(name, tracking_uri=uri)
    if as_json:
        print_json([v.to_dict() for v in versions])
        return
    keys = sorted({k for v in versions for k in v.metrics})[:4]
    table = _table("version", "aliases", *keys, "git", "created")
    for v in versions:
        table.add_row(v.version, ", ".join(v.aliases) or "-", *[_num(v.metrics.get(k)) for k in keys],
                      v.tags.get("capsule.git_commit", "-")[:12], (v.created_at or "")[:19])
    _show(table)


@models.command()
@click.argument("ref", metavar="NAME[@ALIAS|/VERSION]")
@file_option
@tracking_option
@json_option
def show(ref: str, file: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Show one version: metrics, params, provenance, checksums (NAME alone: its latest)."""
    from .. import registry

    _, uri = _store(file, tracking_uri)
    if "@" not in ref and "/" not in ref.removeprefix("models:/"):
        ref = f"{ref}/latest"
    mv = registry.resolve(ref, tracking_uri=uri)
    if as_json:
        print_json(mv.to_dict())
        return
    table = _table("field", "value")
    table.add_row("model", f"{mv.name} version {mv.version}")
    table.add_row("aliases", ", ".join(mv.aliases) or "-")
    table.add_row("created", mv.created_at or "-")
    for k, v in mv.metrics.items():
        table.add_row(f"metric {k}", _num(v))
    for k, v in mv.params.items():
        table.add_row(f"param {k}", v)
    for k, v in sorted(mv.tags.items()):
        if k.startswith("capsule.") and k != "capsule.machine":
            table.add_row(k.removeprefix("capsule."), v)
    table.add_row("source", mv.source)
    _show(table)


@models.command()
@click.argument("ref", metavar="NAME@ALIAS|NAME/VERSION")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="New or empty directory to write model.safetensors, model.py, meta.json, "
                   "checksums.sha256 into.")
@click.option("--force", is_flag=True, help="Replace the model directory at --output (its model files "
              "and stale weights only; a folder holding anything else is still refused).")
@file_option
@tracking_option
@json_option
def pull(ref: str, output: str, force: bool, file: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Download a version as a model directory, verifying every sha256 (nothing is unpickled)."""
    from pathlib import Path

    from .. import registry
    from ..registry.checksums import check_destination

    if not output.strip():  # Path("") is the current directory: never write there by accident
        raise ConfigError("-o/--output: empty path; name the directory to write the model into")
    check_destination(Path(output), force=force)  # before contacting the registry
    _, uri = _store(file, tracking_uri)
    mv = registry.resolve(ref, tracking_uri=uri)
    dest = registry.download(mv.uri, output, tracking_uri=uri, force=force)
    if as_json:
        print_json({**mv.to_dict(), "path": str(dest)})
        return
    console().print(f"[green]pulled[/] {mv.name} version {mv.version} to {dest} "
                    f"({len(mv.checksums)} files, sha256 verified)")


def _report_to_pipeline(mv: Any, decision: Any) -> None:
    """Inside `capsule pipeline run`, tell the run record which version this stage made
    ($CAPSULE_PIPELINE_OUTPUTS names a JSON file the stage may write)."""
    import json
    from pathlib import Path

    target = os.environ.get("CAPSULE_PIPELINE_OUTPUTS")
    if not target:
        return
    path = Path(target)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    data["model_version"] = mv.uri
    if decision is not None:
        data["promotion"] = {"promoted": decision.promoted, "alias": decision.alias, "reason": decision.reason}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _table(*columns: str):
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _show(table, empty: str | None = None) -> None:
    c = console()
    if empty:
        c.print(empty)
    else:
        c.print(table)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


__all__ = ["models", "CapsuleError"]
