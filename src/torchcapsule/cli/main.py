"""Entry point of `capsule`. Imports nothing heavy: each verb's module loads on use."""
from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import CapsuleError

# verb -> "module:attribute" under torchcapsule.cli. Adding a verb is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate:validate", "Check a capsule.yaml and print the resolved project."),
    "init": ("validate:init", "Scaffold a new project from the digits example."),
    "doctor": ("doctor:doctor", "Verify this environment: GPU, CUDA, driver, NCCL, /dev/shm."),
    "image": ("image:image", "Render, lock, lint and build the project image."),
    "dev": ("image:dev", "Start the Jupyter/SSH dev container, safe by default."),
    "run": ("run:run", "Run one stage on a backend (local, docker, slurm, kubernetes)."),
    "jobs": ("run:jobs", "List jobs, show status and logs, cancel."),
    "models": ("models:models", "Register, promote, list, show and pull model versions."),
    "ui": ("ui:ui", "Open the MLflow UI on the project's training runs and models."),
    "serve": ("serve:serve", "Serve a model over HTTP with dynamic batching."),
    "pipeline": ("pipeline:pipeline", "Run the stages as a DAG; show run records."),
    "export": ("export:export", "Export schedules, CI workflows and deployments."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when they run (keeps --help fast)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module, _, attr = entry[0].partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsule")
# main() reads --debug/CAPSULE_DEBUG itself (it must know before click parses anything)
@click.option("--debug", is_flag=True, envvar="CAPSULE_DEBUG", help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """torchcapsule: one version-locked PyTorch image, from the dev box to the cluster."""


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("CAPSULE_DEBUG"))
    try:
        rv = cli.main(args=argv, prog_name="capsule", standalone_mode=False)
    except CapsuleError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2 if isinstance(e, click.UsageError) else e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    # With standalone_mode off, click returns the code given to ctx.exit(code).
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
