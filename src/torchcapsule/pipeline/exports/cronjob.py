"""capsule.yaml -> a Kubernetes CronJob (batch/v1) that runs `capsule pipeline run` on schedule.cron.

The pod runs the whole pipeline in the project image with the local backend, so it asks for the
largest GPU count any stage needs. Run records (and so caching and resume) persist only when
the logs volume is a PersistentVolumeClaim (targets.kubernetes.pvc.logs); promotion stays gated
by the registry rule because the register stage applies it.
"""
from __future__ import annotations

from typing import Any

from ...config import Project
from . import _common as c


def pod_spec(project: Project, container: dict[str, Any], gpus: int) -> dict[str, Any]:
    """A pod spec shared by the CronJob and the serving Deployment: non-root, GPU placement, volumes."""
    k8s = project.targets.kubernetes
    user = project.image.user
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": user.uid,
            "runAsGroup": user.gid or user.uid,
            "fsGroup": user.gid or user.uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if k8s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k8s.image_pull_secrets]
    if gpus:
        if k8s.node_selector:
            spec["nodeSelector"] = dict(k8s.node_selector)
        if k8s.tolerations:
            spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
        if k8s.affinity:
            spec["affinity"] = k8s.affinity
    return spec


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def volumes(project: Project, names: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): a PVC where targets.kubernetes.pvc names one, else an emptyDir
    (the workspace, holding the code, then comes from the image and is not mounted)."""
    paths = c.volume_paths(project)
    pvc = project.targets.kubernetes.pvc
    vols, mounts = [], []
    for name in names:
        if name in pvc:
            vols.append({"name": name, "persistentVolumeClaim": {"claimName": pvc[name]}})
        elif name == "workspace":
            continue
        else:
            vols.append({"name": name, "emptyDir": {}})
        mounts.append({"name": name, "mountPath": paths[name]})
    return vols, mounts


def shm(project: Project, stages: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """A memory-backed /dev/shm as large as the biggest stage's shm_size (DataLoader workers, NCCL)."""
    sizes = [s.resources.shm_bytes for n, s in project.stages.items()
             if s.resources.shm_bytes and (stages is None or n in stages)]
    if not sizes:
        return [], []
    vol = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(max(sizes))}}
    return [vol], [{"name": "dshm", "mountPath": "/dev/shm"}]


def render(project: Project, *, on: str = "local") -> dict[str, Any]:
    cron, tz = c.schedule_of(project, "cronjob")
    name = c.k8s_name(f"{project.name}-pipeline")
    gpus = c.max_gpus(project)
    labels = {"app.kubernetes.io/name": c.k8s_name(project.name),
              "app.kubernetes.io/component": "pipeline",
              "app.kubernetes.io/managed-by": "torchcapsule"}
    vols, mounts = volumes(project, ("workspace", "data", "models", "logs"))
    shm_vols, shm_mounts = shm(project)
    container: dict[str, Any] = {
        "name": "pipeline",
        "image": c.image(project),
        "workingDir": c.volume_paths(project)["workspace"],
        "command": c.pipeline_argv(on),
        "env": [{"name": k, "value": v} for k, v in c.tracking_env(project).items()],
        "securityContext": container_security(),
        "volumeMounts": mounts + shm_mounts,
    }
    if not container["env"]:
        del container["env"]
    if gpus.count:
        container["resources"] = {"limits": {c.GPU_RESOURCE: gpus.count}}
    pod = pod_spec(project, container, gpus.count)
    pod["restartPolicy"] = "Never"
    pod["volumes"] = vols + shm_vols
    if not pod["volumes"]:
        del pod["volumes"]
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": project.targets.kubernetes.namespace, "labels": labels},
        "spec": {
            "schedule": cron,
            "timeZone": tz,
            "concurrencyPolicy": "Forbid",  # two retrainings at once would race on the registry
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    # no Job-level retry: the next scheduled run resumes from the failed stage,
                    # and stage retries are capsule.yaml's `retries`
                    "backoffLimit": 0,
                    "template": {"metadata": {"labels": labels}, "spec": pod},
                },
            },
        },
    }


def text(project: Project, *, on: str = "local") -> str:
    return c.dump_yaml(render(project, on=on), (
        f"Generated by `capsule export cronjob` from capsule.yaml (project {project.name}).\n"
        "Runs `capsule pipeline run` in the project image on schedule.cron; promotion stays gated\n"
        "by registry.promote.rule. Set targets.kubernetes.pvc.logs so run records, caching and\n"
        "resume survive between runs."))
