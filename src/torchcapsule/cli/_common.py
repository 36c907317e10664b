"""Shared CLI pieces: the --file option, project loading, JSON output."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

file_option = click.option(
    "-f", "--file", "file", type=click.Path(dir_okay=True), default=None,
    help="capsule.yaml to use (default: ./capsule.yaml or the nearest parent's).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def load(file: str | None):
    from ..config import load_project

    return load_project(file)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)
