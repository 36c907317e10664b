"""`capsule validate` and `capsule init`."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import ConfigError
from ._common import console, json_option, print_json


@click.command()
@click.argument("file", required=False, type=click.Path())
@json_option
def validate(file: str | None, as_json: bool) -> None:
    """Check FILE (default: ./capsule.yaml) and print the resolved project."""
    from ..config import find_project_file, load_project

    path = find_project_file(file)
    project = load_project(path)
    if as_json:
        print_json(project.model_dump(mode="json"))
        return
    img = project.image
    out = console()
    out.print(f"[green]ok[/] {path}: project [bold]{project.name}[/]")
    out.print(f"  image   torch {img.torch}, {'CPU' if img.cuda == 'cpu' else 'CUDA ' + img.cuda}, "
              f"Python {img.python}, flavor {img.flavor}")
    for name, st in project.stages.items():
        needs = f" (needs {', '.join(st.needs)})" if st.needs else ""
        extra = f", {st.distributed}" if st.distributed != "none" else ""
        out.print(f"  stage   {name}: gpus {st.resources.gpus}, nodes {st.resources.nodes}{extra}{needs}")
    if project.schedule:
        out.print(f"  schedule {project.schedule.cron} ({project.schedule.timezone})")


def example_dir() -> Path:
    """The digits example: bundled in the wheel, or the repository's examples/digits."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "_example", here.parents[1] / "examples" / "digits"):
        if (cand / "capsule.yaml").is_file():
            return cand
    raise ConfigError("the digits example is missing from this installation; reinstall torchcapsule")


_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".capsule", "logs", "models", "data", ".pytest_cache")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="Project name (default: the directory's name).")
@click.option("--force", is_flag=True, help="Write into a directory that already has a capsule.yaml.")
def init(directory: str, name: str | None, force: bool) -> None:
    """Scaffold a new project in DIRECTORY from the digits example."""
    import re

    dest = Path(directory)
    if (dest / "capsule.yaml").exists() and not force:
        raise ConfigError(f"{dest / 'capsule.yaml'} already exists; pass --force to overwrite the scaffold files")
    name = name or dest.resolve().name.lower()
    if not re.match(r"^[a-z0-9][a-z0-9._-]{0,62}$", name):
        raise ConfigError(f"--name: '{name}' is not a valid project name; use lower-case letters, digits, '.', '_' or '-'")
    src = example_dir()
    shutil.copytree(src, dest, ignore=_SKIP, dirs_exist_ok=True)
    cfg = dest / "capsule.yaml"
    text = cfg.read_text()
    text = re.sub(r"(?m)^name:.*$", f"name: {name}", text, count=1)
    text = re.sub(r"(?m)^(\s+model_name:).*$", rf"\1 {name}", text, count=1)
    cfg.write_text(text)
    console().print(f"[green]created[/] {dest}/ (project {name}); next: cd {dest} && capsule validate")
