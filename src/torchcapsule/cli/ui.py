"""`capsule ui`: the MLflow UI on the project's tracking store (see registry/ui.py)."""
from __future__ import annotations

import click

from ._common import file_option, load


@click.command()
@file_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the UI, which has no login, to the network).")
@click.option("--port", type=int, default=5000, show_default=True, help="Port; 0 picks a free one.")
def ui(file: str | None, host: str, port: int) -> int:
    """Open the MLflow UI on the project's runs and models (Ctrl-C stops it)."""
    from ..registry.ui import serve

    return serve(load(file), host=host, port=port, echo=lambda s: click.echo(s))
