"""`capsule export ...`: schedules, CI workflows and deployments generated from capsule.yaml."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from ._common import console, file_option

output_option = click.option("-o", "--output", "output", type=click.Path(), default=None,
                             help="Write to this file (or into this directory); default: stdout.")
on_option = click.option("--on", "on", default="local", show_default=True,
                         help="Backend `capsule pipeline run` uses inside the scheduled job.")


def _write(text: str, output: str | None, default_name: str) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    dest = Path(output)
    if dest.is_dir() or output.endswith("/"):
        dest = dest / default_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(dest)  # never leave a half-written file where the old one was
    console().print(f"[green]wrote[/] {dest}", style=None)


def _project(file):
    from ._common import load

    return load(file)


@click.group()
def export() -> None:
    """Export schedules, CI workflows and deployments from capsule.yaml."""


@export.command()
@file_option
@output_option
@on_option
def cronjob(file, output, on) -> None:
    """Kubernetes CronJob running the pipeline on schedule.cron."""
    from ..pipeline.exports import cronjob as m

    p = _project(file)
    _write(m.text(p, on=on), output, f"{p.name}-pipeline-cronjob.yaml")


@export.command()
@file_option
@output_option
@on_option
@click.option("--operator", type=click.Choice(["docker", "kubernetes"]), default="docker", show_default=True,
              help="docker: BashOperator + `docker run` on the worker; kubernetes: KubernetesPodOperator.")
@click.option("--project-dir", default=None, help="Project directory on the Airflow worker (docker operator).")
def airflow(file, output, on, operator, project_dir) -> None:
    """Apache Airflow 3 DAG running the pipeline on schedule.cron."""
    from ..pipeline.exports import airflow as m

    p = _project(file)
    _write(m.text(p, operator=operator, project_dir=project_dir, on=on), output,
           f"{p.name.replace('-', '_')}_pipeline.py")


@export.command()
@file_option
@output_option
@on_option
def github(file, output, on) -> None:
    """GitHub Actions workflow retraining on schedule.cron (`on: schedule`)."""
    from ..pipeline.exports import github as m

    p = _project(file)
    _write(m.text(m.scheduled(p, on=on), "github"), output, "retrain.yml")


@export.command()
@file_option
@output_option
@on_option
@click.option("--github", "target", flag_value="github", help="GitHub Actions workflow.")
@click.option("--gitlab", "target", flag_value="gitlab", help="GitLab CI file.")
@click.option("--test-stage", default="test", show_default=True, help="Stage run on every push.")
def ci(file, output, on, target, test_stage) -> None:
    """CI: the test stage in the project image on every push, the pipeline on the main branch."""
    if target is None:
        raise ConfigError("capsule export ci: choose --github or --gitlab")
    p = _project(file)
    if target == "github":
        from ..pipeline.exports import github as m

        _write(m.text(m.ci(p, on=on, test_stage=test_stage), "ci --github"), output, "ci.yml")
    else:
        from ..pipeline.exports import gitlab as m

        _write(m.text(m.ci(p, on=on, test_stage=test_stage)), output, ".gitlab-ci.yml")


@export.command()
@file_option
@output_option
@click.option("--kubernetes", "target", flag_value="kubernetes", default=True,
              help="Deployment + Service + HorizontalPodAutoscaler (the only target for now).")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(1), default=4, show_default=True)
@click.option("--gpus", type=click.IntRange(0), default=None,
              help="GPUs per replica (default: 1 for a CUDA image, 0 for a CPU image).")
def serve(file, output, target, replicas, max_replicas, gpus) -> None:
    """Kubernetes manifests for the inference service (the image by its pushed digest)."""
    from ..pipeline.exports import k8s_serve as m

    from ..image.push import require_pushed

    p = _project(file)
    _write(m.text(p, replicas=replicas, max_replicas=max_replicas, gpus=gpus, image=require_pushed(p)), output,
           f"{p.name}-serve.yaml")


@export.command()
@file_option
@output_option
@click.option("--mlflow-image", default=None, help="MLflow server image (default: the official one).")
def compose(file, output, mlflow_image) -> None:
    """docker-compose file: the dev box, the service and an MLflow server (the image by its pushed digest)."""
    from ..pipeline.exports import compose as m

    from ..image.push import require_pushed

    p = _project(file)
    kw = {"mlflow_image": mlflow_image} if mlflow_image else {}
    _write(m.text(p, image=require_pushed(p), **kw), output, "compose.yaml")
