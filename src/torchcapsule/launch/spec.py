"""Stage -> JobSpec (pure apart from reading the project's paths)."""
from __future__ import annotations

import shlex

from ..config import GpuRequest, Project, parse_gpus
from ..errors import ConfigError, ImageError
from .api import JobSpec


def job_spec(project: Project, stage_name: str, *, gpus: str | int | None = None,
             nodes: int | None = None, image: str | None = None) -> JobSpec:
    """Resolve a stage of capsule.yaml, with CLI overrides (--gpus, --nodes), into a JobSpec."""
    from ..image.tags import project_tag

    stage = project.stage(stage_name)
    res = stage.resources
    try:
        gpu_req: GpuRequest = parse_gpus(gpus) if gpus is not None else res.gpus
    except ValueError as e:
        raise ConfigError(f"--gpus: {e}") from None
    if nodes is not None and nodes < 1:
        raise ConfigError(f"--nodes: {nodes} is not a node count; use 1 or more")
    try:
        command = tuple(shlex.split(stage.run))
    except ValueError as e:
        raise ConfigError(f"{project.root / 'capsule.yaml'}: stages.{stage_name}.run: {e}; fix the quoting") from None
    volumes = {v: project.volume_path(v) for v in ("workspace", "data", "models", "logs")}
    workdir = (project.root / stage.workdir).resolve() if stage.workdir else volumes["workspace"]
    return JobSpec(
        project=project.name,
        stage=stage_name,
        command=command,
        image=image or project_tag(project),
        workdir=workdir,
        volumes=volumes,
        env=dict(stage.env),
        gpus=gpu_req,
        nodes=nodes or res.nodes,
        cpus=res.cpus,
        memory_bytes=res.memory_bytes,
        shm_bytes=res.shm_bytes,
        time_limit=res.time,
        distributed=stage.distributed,
        retries=stage.retries,
        labels={"torchcapsule.project": project.name, "torchcapsule.stage": stage_name},
        tracking=tracking_env(project, stage_name, image or project_tag(project)),
    )


def tracking_env(project: Project, stage_name: str, image: str) -> dict[str, str]:
    """What the job's MetricsLogger needs to track it in the project's MLflow store: the store,
    its artifact root, and the run's lineage (command, git commit, image, lock hash)."""
    import json

    from ..registry import facts
    from ..registry.store import artifact_root, tracking_uri

    if project.stage(stage_name).env.get("CAPSULE_TRACKING") == "off":
        return {}
    uri = tracking_uri(project)
    context = {"project": project.name, "stage": stage_name, "command": project.stage(stage_name).run,
               "git_commit": facts.git_commit(project.root), "image_tag": image,
               "lock_hash": facts.lock_hash(project)}
    try:  # the image's registry digest, when `capsule image push` recorded one
        from ..image.push import pinned

        pushed = pinned(project.root, project.image.flavor)
    except ImageError:  # an unreadable record: lineage without the digest
        pushed = None
    if pushed is not None:
        context["image_digest"] = pushed.pinned
    return {"CAPSULE_TRACKING_URI": uri, "CAPSULE_TRACKING_ARTIFACTS": artifact_root(project) or "",
            "CAPSULE_TRACKING_CONTEXT": json.dumps(context, sort_keys=True)}


def pulled_image(project: Project, backend) -> tuple[str | None, str | None]:
    """(image to name, refusal) for a backend whose machines pull the image from a registry: the
    pushed digest, or the tag with the one line that says why a cluster cannot pull it yet
    (image.push.pull_ref). (None, None) for backends that run the local image."""
    if not backend.pulls_image:
        return None, None
    from ..image.push import pull_ref

    return pull_ref(project)
