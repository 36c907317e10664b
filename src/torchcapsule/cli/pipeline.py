"""`capsule pipeline run|status`: the stages as a DAG, with run records, caching and resume."""
from __future__ import annotations

import click

from ._common import console, file_option, json_option, load, print_json


@click.group()
def pipeline() -> None:
    """Run the stages of capsule.yaml as a DAG; show run records."""


@pipeline.command()
@file_option
@click.option("--on", "on", default="local", show_default=True,
              help="Backend every stage runs on: local, docker, slurm or kubernetes.")
@click.option("--from", "from_stage", metavar="STAGE", default=None,
              help="Start at STAGE: run it and everything downstream of it.")
@click.option("--only", "only", metavar="STAGE", multiple=True,
              help="Run only this stage (repeatable); its needs are not pulled in.")
@click.option("--force", is_flag=True, help="Rerun stages even when their inputs did not change.")
@click.option("--no-doctor", "no_doctor", is_flag=True, help="Skip the pre-flight `capsule doctor` check.")
@click.option("--quiet", "-q", is_flag=True, help="Do not stream the stages' logs (non-terminal output).")
@json_option
def run(file: str | None, on: str, from_stage: str | None, only: tuple[str, ...], force: bool,
        no_doctor: bool, quiet: bool, as_json: bool) -> int:
    """Run the pipeline: doctor, then each stage in order, skipping unchanged ones.

    A failed or interrupted run resumes at its failed stage the next time.
    """
    import signal

    from ..pipeline.runner import PipelineRunner, RunOptions
    from ..pipeline.view import Progress, summary

    project = load(file)
    out = console()
    if as_json:
        from rich.console import Console
        import io
        out = Console(file=io.StringIO())  # progress goes nowhere; the record is the output

    def _term(signum, frame):  # `kubectl delete`, docker stop, Slurm: same as Ctrl-C
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    runner = PipelineRunner(project, RunOptions(on=on, from_stage=from_stage, only=only, force=force,
                                                doctor=not no_doctor), events=Progress(out, stream_logs=not quiet))
    rec = runner.run()
    if as_json:
        print_json(rec.to_dict())
    else:
        summary(out, rec, runner.logs)
    return 0 if rec.state == "succeeded" else 1


@pipeline.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@file_option
@click.option("--all", "show_all", is_flag=True, help="List every recorded run.")
@json_option
def status(run_id: str | None, file: str | None, show_all: bool, as_json: bool) -> None:
    """Show a run record (default: the latest run)."""
    from ..pipeline.record import RunStore
    from ..pipeline.view import summary

    project = load(file)
    logs = project.volume_path("logs")
    store = RunStore(logs)
    if show_all:
        recs = store.all()
        if as_json:
            print_json([r.to_dict() for r in recs])
            return
        from rich.table import Table

        t = Table(title=f"pipeline runs in {store.dir}", title_justify="left")
        for col in ("run", "state", "backend", "stages", "model"):
            t.add_column(col)
        for r in recs:
            done = sum(s.state in ("succeeded", "skipped") for s in r.stages)
            t.add_row(r.run_id, r.state, r.backend, f"{done}/{len(r.stages)}", r.model_version or "")
        console().print(t)
        return
    rec = store.load(run_id)
    if as_json:
        print_json(rec.to_dict())
        return
    summary(console(), rec, logs)
