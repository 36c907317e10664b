"""`capsule run STAGE` and `capsule jobs ...`: generic over backends (torchcapsule.launch.get_backend).

A backend plugs in by implementing the Backend hooks; nothing here names a particular one
except the default `--on local`.
"""
from __future__ import annotations

import os
import sys
import time

import click

from ._common import file_option, json_option, load, print_json


@click.command()
@click.argument("stage")
@file_option
@click.option("--on", "backend_name", default="local", show_default=True, metavar="BACKEND",
              help="Where to run: local, docker, slurm or kubernetes.")
@click.option("--gpus", default=None, metavar="N|TYPE:N", help="GPUs per node (overrides the stage's resources).")
@click.option("--nodes", type=int, default=None, metavar="N", help="Nodes (overrides the stage's resources).")
@click.option("--dry-run", is_flag=True, help="Print the exact command/script and environment; run nothing.")
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return at once.")
@click.option("--force", is_flag=True, help="Cancel a running job of this stage that holds its checkpoints, then run.")
def run(stage: str, file: str | None, backend_name: str, gpus: str | None, nodes: int | None,
        dry_run: bool, detach: bool, force: bool) -> int:
    """Run STAGE of capsule.yaml; streams its logs and exits with its exit code."""
    from ..launch import get_backend
    from ..launch.spec import job_spec, pulled_image

    project = load(file)
    backend = get_backend(backend_name, project=project)
    image, refusal = pulled_image(project, backend)  # a cluster pulls it: by its pushed digest
    spec = job_spec(project, stage, gpus=gpus, nodes=nodes, image=image)
    if dry_run:
        click.echo(backend.dryrun(spec).text)
        if refusal:
            click.echo(f"note: a real submission would be refused: {refusal}", err=True)
        return 0
    if refusal:
        from ..errors import ImageError

        backend.check_available()  # a backend that cannot be used at all is the first thing to fix
        raise ImageError(refusal)
    if backend_name in ("local", "slurm"):  # checkpoints on this machine's (or a shared) filesystem
        _one_writer(spec, force=force)
    job_id = backend.submit(spec)
    if detach:
        click.echo(job_id)
        return 0
    click.echo(f"job {job_id}", err=True)
    code = _follow(backend, job_id, what=f"stage '{stage}'")
    _catch_up_tracking(spec)
    return code


def _catch_up_tracking(spec) -> None:
    """Metrics the job could not send to MLflow itself are sent from here (see registry/tracking)."""
    from ..registry.tracking import catch_up_job

    for note in catch_up_job(spec):
        click.echo(f"note: {note}", err=True)


def _one_writer(spec, *, force: bool) -> None:
    """Refuse a second run of a ddp stage whose checkpoint directory a running job holds (it would
    resume from, prune and overwrite that job's checkpoints); --force cancels that job first."""
    from .. import dirlock
    from ..errors import CheckpointBusy
    from ..launch import get_backend

    if spec.distributed != "ddp":
        return
    # The variables checkpoint_dir reads, as the job gets them on this machine (host paths).
    env = {"CAPSULE_PROJECT": spec.project, "CAPSULE_STAGE": spec.stage, **spec.env}
    if "models" in spec.volumes:
        env.setdefault("CAPSULE_MODELS_DIR", str(spec.volumes["models"]))
    ckdir = spec.workdir / dirlock.checkpoint_dir(env)
    holder = dirlock.holder(ckdir)
    if holder is None:
        return
    job = holder.split()[0]
    if ":" not in job:  # a run capsule did not start (plain torchrun): nothing to cancel for it
        raise CheckpointBusy(f"stage '{spec.stage}': {ckdir} is in use by {holder}; wait for it or stop it")
    if not force:
        raise CheckpointBusy(
            f"stage '{spec.stage}' is already running as {job}, which holds {ckdir}; "
            f"wait for it, `capsule jobs cancel {job}`, or rerun with --force (cancels it first)")
    click.echo(f"--force: cancelling {job}, which holds {ckdir}", err=True)
    get_backend(job.partition(":")[0]).cancel(job)
    deadline = time.monotonic() + 120
    while dirlock.holder(ckdir) is not None:  # released when its supervisor ends, after the checkpoint
        if time.monotonic() > deadline:
            raise CheckpointBusy(f"{job} still holds {ckdir} 120 s after the cancel; see `capsule jobs status {job}`")
        time.sleep(0.2)


def _follow(backend, job_id: str, *, what: str) -> int:
    """Stream the job's log to stdout until it ends; Ctrl-C cancels it. Returns its exit code."""
    try:
        for line in backend.logs(job_id, follow=True):
            click.echo(line)
        st = backend.wait(job_id, poll_s=0.2)
    except BrokenPipeError:  # `capsule run train | head`: the job goes on; see `capsule jobs logs`
        sys.stderr.write(f"output closed; {job_id} keeps running (capsule jobs logs {job_id})\n")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except KeyboardInterrupt:
        click.echo(f"interrupted: cancelling {job_id} (ranks get SIGTERM and may save a checkpoint)", err=True)
        backend.cancel(job_id)
        st = backend.wait(job_id, poll_s=0.5, timeout_s=60)
        # 75: the ranks saved a checkpoint; anything else (e.g. torchrun's 1 when it is signalled
        # before the ranks start) is the interrupt, reported as shells do: 128 + SIGINT.
        return 75 if st.exit_code == 75 else 130
    code = st.exit_code if st.exit_code is not None else (0 if st.state.value == "SUCCEEDED" else 1)
    if st.state.value != "SUCCEEDED":
        detail = f": {st.reason}" if st.reason and "exit code" in st.reason else \
            f": {st.reason} (exit code {code})" if st.reason else f" with exit code {code}"
        click.echo(f"error: {what} ({job_id}) {st.state.value.lower()}{detail}", err=True)
        return code or 1
    return 0


@click.group()
def jobs() -> None:
    """List jobs on every backend; show status and logs; cancel."""


@jobs.command("list")
@click.option("--on", "backend_name", default=None, metavar="BACKEND", help="Only this backend.")
@json_option
def jobs_list(backend_name: str | None, as_json: bool) -> int:
    """Jobs of every available backend (unavailable ones are skipped with a note)."""
    from ..errors import BackendError
    from ..launch import BACKENDS, get_backend

    names = [backend_name] if backend_name else list(BACKENDS)
    rows, skipped = [], {}
    for name in names:
        try:
            backend = get_backend(name)
            backend.check_available()
            rows.extend(backend.list())
        except BackendError as e:
            if backend_name:  # asked for this one explicitly: its problem is the answer
                raise
            skipped[name] = str(e)
    if as_json:
        print_json({"jobs": [r.to_dict() for r in rows], "skipped": skipped})
        return 0
    for name, why in skipped.items():
        click.echo(f"note: skipped {name}: {why}", err=True)
    if not rows:
        click.echo("no jobs")
        return 0
    header = ("JOB", "NAME", "STATE", "EXIT", "STARTED")
    table = [header] + [
        (r.job_id, r.name or "-", r.state.value, "-" if r.exit_code is None else str(r.exit_code),
         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)) if r.started_at else "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:  # plain columns: job ids are never cut, and the output greps well
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


@jobs.command("status")
@click.argument("job_id")
@json_option
def jobs_status(job_id: str, as_json: bool) -> int:
    """State and exit code of JOB_ID (BACKEND:ID)."""
    st = _backend_for(job_id).status(job_id)
    if as_json:
        print_json(st.to_dict())
        return 0
    code = "" if st.exit_code is None else f" exit code {st.exit_code}"
    reason = f" ({st.reason})" if st.reason else ""
    click.echo(f"{st.job_id} {st.state.value}{code}{reason}")
    return 0


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def jobs_logs(job_id: str, follow: bool) -> int:
    """Print the output of JOB_ID (all ranks, prefixed with their rank)."""
    backend = _backend_for(job_id)
    backend.status(job_id)  # JobNotFound before streaming anything
    try:
        for line in backend.logs(job_id, follow=follow):
            click.echo(line)
    except KeyboardInterrupt:
        return 130
    return 0


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> int:
    """Cancel JOB_ID: ranks get SIGTERM (and save a checkpoint), SIGKILL after a grace period."""
    from ..errors import BackendError

    backend = _backend_for(job_id)
    st = backend.status(job_id)
    if st.state.terminal:
        try:  # an ended job may still have left processes behind (a local job whose supervisor died)
            backend.cancel(job_id)
        except BackendError:
            pass  # e.g. a Slurm job it no longer knows: it is over either way
        after = backend.status(job_id)
        click.echo(f"{job_id} {after.state.value}: {after.reason}" if after != st else f"{job_id} already {st.state.value}")
        return 0
    backend.cancel(job_id)
    click.echo(f"cancelling {job_id}", err=sys.stderr.isatty())
    return 0


def _backend_for(job_id: str):
    from ..launch import backend_of, get_backend

    name, _ = backend_of(job_id)
    return get_backend(name)
