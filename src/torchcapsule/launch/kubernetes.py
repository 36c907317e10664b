"""Kubernetes backend: a batch/v1 Job (one node), an Indexed Job + headless Service (several
nodes), or a Kubeflow PyTorchJob (`targets.kubernetes.operator: kubeflow`).

`manifests()` is pure: plain dicts, dumped as YAML documents by dryrun(). Submission, status,
logs and cancel go through the official `kubernetes` Python client with the user's kubeconfig;
the API objects are injectable (`apis=`) so the submit path is unit-tested against the
client's real method names. Cancel suspends the Job (pods get SIGTERM, then SIGKILL after the
grace period) and marks it, so the Job and its logs remain readable as CANCELLED.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import GpuRequest, KubernetesTarget, Project
from ..errors import BackendError, JobNotFound
from .api import CONTAINER_MOUNTS, Backend, DryRun, JobSpec, JobState, JobStatus, timestamp
from .command import RDZV_PORT, nproc, stage_command
from .failure import ended_state, explain_failure

GROUP = "torchcapsule.io"
JOB_LABEL = f"{GROUP}/job"
CANCELLED = f"{GROUP}/cancelled"
KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")

# batch/v1 Job conditions (type with status "True") -> JobState.
JOB_CONDITIONS: dict[str, JobState] = {
    "Complete": JobState.SUCCEEDED,
    "SuccessCriteriaMet": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "FailureTarget": JobState.FAILED,
    "Suspended": JobState.PENDING,  # CANCELLED when torchcapsule suspended it
}
# Kubeflow PyTorchJob conditions (the last one with status "True" wins).
KUBEFLOW_CONDITIONS: dict[str, JobState] = {
    "Created": JobState.PENDING,
    "Running": JobState.RUNNING,
    "Restarting": JobState.RUNNING,
    "Succeeded": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "Suspended": JobState.PENDING,
}

# nvidia.com/gpu.product values that NVIDIA's GPU feature discovery gives each GPU type.
GPU_PRODUCTS: dict[str, tuple[str, ...]] = {
    "V100": ("Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-16GB", "Tesla-V100-PCIE-32GB"),
    "T4": ("Tesla-T4",),
    "A100": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"),
    "A10G": ("NVIDIA-A10G",),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "H200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "B200": ("NVIDIA-B200",),
}
PRODUCT_LABEL = "nvidia.com/gpu.product"


# -- pure: names, quantities, manifests ------------------------------------------------------
def dns_name(text: str, max_len: int = 52) -> str:
    """A DNS-1123 label; 52 leaves room for the '-<index>' of indexed pods' hostnames."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:max_len].rstrip("-") or "job"


def job_name(spec: JobSpec, suffix: str | None = None) -> str:
    suffix = suffix or os.urandom(3).hex()
    return f"{dns_name(spec.name, 45)}-{suffix}"


def quantity(nbytes: int) -> str:
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def gpu_placement(req: GpuRequest, target: KubernetesTarget) -> tuple[dict[str, str], list[str]]:
    """(extra nodeSelector, allowed products for a node affinity) for a typed GPU request."""
    if not req.count or not req.type:
        return {}, []
    pinned = target.node_selector.get(PRODUCT_LABEL)
    if pinned is not None:
        if req.type.lower() not in pinned.lower():
            raise BackendError(
                f"--gpus {req}: targets.kubernetes.node_selector pins {PRODUCT_LABEL}={pinned}, "
                f"which is not a {req.type}; ask for that GPU type or change the node selector")
        return {}, []
    products = GPU_PRODUCTS.get(req.type)
    if not products:
        raise BackendError(f"--gpus {req}: no known {PRODUCT_LABEL} label for {req.type}; set "
                           f"targets.kubernetes.node_selector.{PRODUCT_LABEL} to your nodes' value")
    if len(products) == 1:
        return {PRODUCT_LABEL: products[0]}, []
    return {}, list(products)


def _affinity(target: KubernetesTarget, products: list[str]) -> dict[str, Any] | None:
    import copy

    aff = copy.deepcopy(target.affinity) if target.affinity else None
    if not products:
        return aff
    expr = {"key": PRODUCT_LABEL, "operator": "In", "values": products}
    aff = aff or {}
    req = aff.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []})
    terms = req.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": []})
    for term in terms:  # terms are ORed: the GPU type must hold in each
        term.setdefault("matchExpressions", []).append(expr)
    return aff


@dataclass(frozen=True)
class PodUser:
    uid: int = 1000
    gid: int = 1000


def pod_spec(spec: JobSpec, target: KubernetesTarget, user: PodUser, *, rdzv_endpoint: str | None,
             rdzv_id: str | None = None, container: str = "main", restart: str = "Never") -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {}
    if spec.gpus.count:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = spec.gpus.count
    if spec.cpus:
        resources.setdefault("requests", {})["cpu"] = str(spec.cpus)
    if spec.memory_bytes:
        resources.setdefault("requests", {})["memory"] = quantity(spec.memory_bytes)
        resources.setdefault("limits", {})["memory"] = quantity(spec.memory_bytes)
    # /dev/shm backed by memory: a container runtime's default 64 MB breaks DataLoader workers/NCCL.
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.shm_bytes:
        shm["sizeLimit"] = quantity(spec.shm_bytes)
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": shm}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for vol, claim in target.pvc.items():
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": CONTAINER_MOUNTS[vol]})
    argv, env = stage_command(spec, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                              mounts=dict(CONTAINER_MOUNTS), cpu_count=spec.cpus or 1)
    main: dict[str, Any] = {
        "name": container,
        "image": spec.image,
        "command": argv,
        # A failed container's last log lines become its status message: torchrun's summary
        # there names the failing rank and its own exit code (torchrun itself exits 1).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "workingDir": CONTAINER_MOUNTS["workspace"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if spec.distributed == "ddp" and spec.nodes > 1:
        main["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT}]
    pod: dict[str, Any] = {
        "restartPolicy": restart,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": user.uid, "runAsGroup": user.gid, "fsGroup": user.gid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [main],
        "volumes": volumes,
    }
    extra_selector, products = gpu_placement(spec.gpus, target)
    selector = {**target.node_selector, **extra_selector}
    if selector:
        pod["nodeSelector"] = selector
    if target.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in target.tolerations]
    affinity = _affinity(target, products)
    if affinity:
        pod["affinity"] = affinity
    if target.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in target.image_pull_secrets]
    if target.service_account:
        pod["serviceAccountName"] = target.service_account
    return pod


def _labels(spec: JobSpec, name: str) -> dict[str, str]:
    return {f"{GROUP}/project": dns_name(spec.project, 63), f"{GROUP}/stage": dns_name(spec.stage, 63),
            JOB_LABEL: name}


def manifests(spec: JobSpec, target: KubernetesTarget, name: str, user: PodUser = PodUser()) -> list[dict[str, Any]]:
    """The objects to create for a stage, in creation order (pure)."""
    ns = target.namespace
    labels = _labels(spec, name)
    meta = {"name": name, "namespace": ns, "labels": labels}
    if target.operator == "kubeflow" and spec.distributed == "ddp":
        return [_pytorchjob(spec, target, name, meta, labels, user)]
    multi = spec.nodes > 1
    # Several nodes: rank 0's pod (stable DNS name via the headless Service) hosts the rendezvous.
    endpoint = f"{name}-0.{name}:{RDZV_PORT}" if multi else "localhost:0"
    pod = pod_spec(spec, target, user, rdzv_endpoint=endpoint, rdzv_id=name)
    job_spec: dict[str, Any] = {
        # ddp stages retry inside torchrun; others let the Job recreate the pod.
        "backoffLimit": 0 if spec.distributed == "ddp" else spec.retries,
        # A preempted/evicted pod is not the job's fault: retry it without using up backoffLimit.
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if spec.time_limit:
        job_spec["activeDeadlineSeconds"] = int(spec.time_limit.total_seconds())
    docs: list[dict[str, Any]] = []
    if multi:
        # Indexed pods get stable hostnames <job>-<index>.<service>; rank 0 hosts the rendezvous.
        job_spec.update({"completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes})
        pod["subdomain"] = name
        docs.append({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": "None", "selector": {JOB_LABEL: name}, "publishNotReadyAddresses": True,
                     "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
        })
    docs.insert(0, {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec})
    return docs


def _pytorchjob(spec: JobSpec, target: KubernetesTarget, name: str, meta: dict, labels: dict,
                user: PodUser) -> dict[str, Any]:
    # The operator sets the rendezvous and node count (PET_*) and restarts failed pods itself.
    pod = pod_spec(spec, target, user, rdzv_endpoint=None, container="pytorch", restart="OnFailure")
    replica = {"replicas": 1, "restartPolicy": "OnFailure",
               "template": {"metadata": {"labels": labels}, "spec": pod}}
    replicas = {"Master": replica}
    if spec.nodes > 1:
        replicas["Worker"] = {**replica, "replicas": spec.nodes - 1}
    policy: dict[str, Any] = {"backoffLimit": spec.retries, "cleanPodPolicy": "None"}
    if spec.time_limit:  # the operator fails the job after this long, as a Job's own deadline does
        policy["activeDeadlineSeconds"] = int(spec.time_limit.total_seconds())
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta,
            "spec": {"nprocPerNode": str(nproc(spec)), "runPolicy": policy, "pytorchReplicaSpecs": replicas}}


def dump_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    class NoAliases(yaml.SafeDumper):  # shared label dicts must not become &id001 anchors
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return "".join("---\n" + yaml.dump(d, Dumper=NoAliases, sort_keys=False) for d in docs)


def job_status(obj: dict[str, Any], pods: list[dict[str, Any]], job_id: str, log: str = "") -> JobStatus:
    """A batch/v1 Job or a Kubeflow PyTorchJob (+ its pods) as the API returns them, camelCase
    -> JobStatus (pure). A failure reports the failing rank's own code: from `log` (the failing
    pod's log tail) or else its containers' termination messages (FallbackToLogsOnError)."""
    meta, st = obj.get("metadata", {}), obj.get("status", {}) or {}
    cancelled = (meta.get("annotations") or {}).get(CANCELLED) == "true"
    true = [c for c in st.get("conditions") or [] if c.get("status") == "True"]
    state, reason = None, None
    if obj.get("kind") == "PyTorchJob":  # the last true condition is the state
        if true:
            state, reason = KUBEFLOW_CONDITIONS.get(true[-1]["type"], JobState.UNKNOWN), true[-1].get("message")
    else:
        for c in true:
            if c["type"] in JOB_CONDITIONS and JOB_CONDITIONS[c["type"]].terminal:
                state, reason = JOB_CONDITIONS[c["type"]], c.get("message") or c.get("reason")
                break
        if state is None and st.get("active"):
            state = JobState.RUNNING if (st.get("ready") or 0) or _any_running(pods) else JobState.PENDING
    state = state or JobState.PENDING
    if cancelled and not state.terminal:
        state, reason = JobState.CANCELLED, f"cancelled by `capsule jobs cancel` ({obj.get('kind', 'Job')} suspended)"
    code, messages = terminated(pods) if state.terminal else (None, "")
    if state is JobState.FAILED:
        code, reason = explain_failure(code or None, "\n".join(x for x in (messages, log) if x), context=(reason,))
        state = ended_state(code)
    return JobStatus(job_id, state, code, reason, name=meta.get("name"),
                     started_at=timestamp(st.get("startTime")), finished_at=timestamp(st.get("completionTime")))


def _any_running(pods: list[dict]) -> bool:
    return any((p.get("status") or {}).get("phase") == "Running" for p in pods)


def terminated(pods: list[dict[str, Any]]) -> tuple[int | None, str]:
    """(worst exit code of the pods' terminated containers, non-zero wins; the failed ones'
    termination messages, the ends of their logs)."""
    codes, messages = [], []
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode") is not None:
                codes.append(int(term["exitCode"]))
                if codes[-1] and term.get("message"):
                    messages.append(term["message"])
    bad = [c for c in codes if c != 0]
    return (bad[0] if bad else 0) if codes else None, "\n".join(messages)


def lead_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod whose log is the job's log: index 0 / master, newest attempt."""
    def key(p: dict) -> tuple:
        meta = p.get("metadata") or {}
        ann, labels = meta.get("annotations") or {}, meta.get("labels") or {}
        index = ann.get("batch.kubernetes.io/job-completion-index", "0")
        master = labels.get("training.kubeflow.org/replica-type", "master").lower() == "master"
        return (index == "0" and master, meta.get("creationTimestamp") or "")
    return max(pods, key=key) if pods else None


# -- effects: the official client ------------------------------------------------------------
@dataclass
class Apis:
    """The client API objects used (BatchV1Api, CoreV1Api, CustomObjectsApi) and a serializer."""

    batch: Any
    core: Any
    custom: Any

    @staticmethod
    def plain(obj: Any) -> Any:
        """Client model objects -> the API's camelCase dicts (dicts pass through)."""
        from kubernetes.client import ApiClient

        return ApiClient().sanitize_for_serialization(obj)


def kubeconfig_paths() -> list[Path]:
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path.home() / ".kube" / "config"]


class KubernetesBackend(Backend):
    name = "kubernetes"
    pulls_image = True

    def __init__(self, project: Project | None = None, target: KubernetesTarget | None = None,
                 apis: Apis | None = None) -> None:
        self.target = target or (project.targets.kubernetes if project else KubernetesTarget())
        # `capsule jobs list` outside a project: look in every namespace the user may read.
        self.all_namespaces = project is None and target is None
        user = project.image.user if project else None
        self.user = PodUser(user.uid, user.gid or user.uid) if user else PodUser()
        self._apis = apis

    def check_available(self) -> None:
        if self._apis is not None:
            return
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return  # in a pod: in-cluster config
        paths = kubeconfig_paths()
        if not any(p.is_file() for p in paths):
            raise BackendError(
                f"no kubeconfig at {os.pathsep.join(map(str, paths))}; point KUBECONFIG at your "
                "cluster's config (e.g. from `gcloud/aws/az ... get-credentials`) or use --on docker/slurm")
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise BackendError("the kubernetes Python client is missing; pip install 'torchcapsule[kubernetes]'") from None

    @property
    def apis(self) -> Apis:
        if self._apis is None:
            self.check_available()
            from kubernetes import client, config

            try:
                if os.environ.get("KUBERNETES_SERVICE_HOST") and not any(p.is_file() for p in kubeconfig_paths()):
                    config.load_incluster_config()
                else:
                    config.load_kube_config(context=self.target.context)
            except config.ConfigException as e:
                raise BackendError(f"kubeconfig: {str(e).splitlines()[0]}; fix it or set "
                                   "targets.kubernetes.context") from None
            self._apis = Apis(client.BatchV1Api(), client.CoreV1Api(), client.CustomObjectsApi())
        return self._apis

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one API call; turn refusals and unreachable clusters into one-line errors."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # ApiException, urllib3 errors: the client has no common base
            status = getattr(e, "status", None)
            transport = type(e).__module__.startswith(("urllib3", "kubernetes")) or isinstance(e, OSError)
            if status is None and not transport:
                raise  # a bug, not the cluster: keep the traceback
            if status == 404 and what.startswith("creating"):
                raise BackendError(f"{what}: {_api_message(e)}; create the namespace (kubectl create "
                                   "namespace NAME) or set targets.kubernetes.namespace") from None
            if status == 404:
                raise JobNotFound(f"{what}: not found ({_api_message(e)}); check the namespace "
                                  f"(targets.kubernetes.namespace) and `capsule jobs list`") from None
            if status in (401, 403):
                raise BackendError(f"{what}: the cluster refused ({_api_message(e)}); "
                                   "check your kubeconfig user's RBAC permissions") from None
            if status is not None:
                raise BackendError(f"{what}: {status} {_api_message(e)}") from None
            raise BackendError(f"{what}: cannot reach the Kubernetes API ({str(e).splitlines()[0]}); "
                               "check the cluster address in your kubeconfig and your network") from None

    def dryrun(self, spec: JobSpec) -> DryRun:
        docs = manifests(spec, self.target, job_name(spec), self.user)
        return DryRun(self.name, spec, dump_yaml(docs), docs)

    def schedule(self, dryrun: DryRun) -> str:
        apis = self.apis
        docs = dryrun.request
        ns = self.target.namespace
        for doc in docs:
            kind = doc["kind"]
            what = f"creating {kind} {ns}/{doc['metadata']['name']}"
            if kind == "Job":
                self._call(what, apis.batch.create_namespaced_job, namespace=ns, body=doc)
            elif kind == "Service":
                self._call(what, apis.core.create_namespaced_service, namespace=ns, body=doc)
            elif kind == "PyTorchJob":
                group, version, plural = KUBEFLOW
                self._call(what, apis.custom.create_namespaced_custom_object, group=group,
                           version=version, namespace=ns, plural=plural, body=doc)
        return self.job_id(f"{ns}/{docs[0]['metadata']['name']}")

    def _ns_name(self, job_id: str) -> tuple[str, str]:
        ns, sep, name = self.native(job_id).partition("/")
        if not sep or not ns or not name:
            raise JobNotFound(f"'{job_id}' is not a Kubernetes job id (kubernetes:NAMESPACE/NAME); "
                              "see `capsule jobs list`")
        return ns, name

    def _pods(self, ns: str, name: str) -> list[dict]:
        r = self._call(f"listing pods of {ns}/{name}", self.apis.core.list_namespaced_pod,
                       namespace=ns, label_selector=f"{JOB_LABEL}={name}")
        return self.apis.plain(r).get("items") or []

    def _get(self, ns: str, name: str) -> tuple[str, dict]:
        """('Job'|'PyTorchJob', object as a camelCase dict)."""
        try:
            job = self._call(f"reading Job {ns}/{name}", self.apis.batch.read_namespaced_job,
                             name=name, namespace=ns)
            return "Job", self.apis.plain(job)
        except JobNotFound as not_a_job:
            if self.target.operator != "kubeflow" and not self.all_namespaces:
                raise
            missing = not_a_job  # `capsule jobs` has no project: it may be a PyTorchJob
        group, version, plural = KUBEFLOW
        try:
            obj = self._call(f"reading PyTorchJob {ns}/{name}", self.apis.custom.get_namespaced_custom_object,
                             group=group, version=version, namespace=ns, plural=plural, name=name)
        except JobNotFound:
            raise missing from None
        return "PyTorchJob", self.apis.plain(obj)

    def status(self, job_id: str) -> JobStatus:
        ns, name = self._ns_name(job_id)
        kind, obj = self._get(ns, name)
        pods = self._pods(ns, name)
        obj = {**obj, "kind": kind}
        st = job_status(obj, pods, self.job_id(f"{ns}/{name}"))
        if st.state is JobState.FAILED:  # the end of the failed pod's log, and its rank's own code
            st = job_status(obj, pods, st.job_id, log=self._log_tail(ns, pods))
        return st

    def _log_tail(self, ns: str, pods: list[dict], lines: int = 80) -> str:
        pod = lead_pod([p for p in pods if terminated([p])[0]] or pods)
        if pod is None:
            return ""
        try:
            return self.apis.core.read_namespaced_pod_log(
                name=pod["metadata"]["name"], namespace=ns, tail_lines=lines)
        except Exception:
            return ""  # the reason is still reported without the tail

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        ns, name = self._ns_name(job_id)
        self._get(ns, name)
        pod = lead_pod(self._pods(ns, name))
        if pod is None:
            return  # not scheduled yet
        pod_name = pod["metadata"]["name"]
        what = f"reading the log of pod {ns}/{pod_name}"
        if not follow:
            text = self._call(what, self.apis.core.read_namespaced_pod_log, name=pod_name, namespace=ns)
            yield from text.splitlines()
            return
        resp = self._call(what, self.apis.core.read_namespaced_pod_log, name=pod_name, namespace=ns,
                          follow=True, _preload_content=False)
        buf = b""
        for chunk in resp.stream():
            buf += chunk
            *done, buf = buf.split(b"\n")
            for line in done:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")

    def _cancel_existing(self, native: str) -> None:
        ns, name = self._ns_name(self.job_id(native))
        kind, _ = self._get(ns, name)
        what = f"cancelling {kind} {ns}/{name}"
        mark = {"metadata": {"annotations": {CANCELLED: "true"}}}
        if kind == "Job":
            self._call(what, self.apis.batch.patch_namespaced_job, name=name, namespace=ns,
                       body={**mark, "spec": {"suspend": True}})
        else:
            group, version, plural = KUBEFLOW
            self._call(what, self.apis.custom.patch_namespaced_custom_object, group=group, version=version,
                       namespace=ns, plural=plural, name=name,
                       body={**mark, "spec": {"runPolicy": {"suspend": True}}})

    def list(self) -> list[JobStatus]:
        if self.all_namespaces:
            r = self._call("listing Jobs", self.apis.batch.list_job_for_all_namespaces, label_selector=JOB_LABEL)
        else:
            ns = self.target.namespace
            r = self._call(f"listing Jobs in {ns}", self.apis.batch.list_namespaced_job,
                           namespace=ns, label_selector=JOB_LABEL)
        out = []
        for job in self.apis.plain(r).get("items") or []:
            meta = job["metadata"]
            out.append(job_status(job, [], self.job_id(f"{meta['namespace']}/{meta['name']}")))
        return out


def _api_message(e: Exception) -> str:
    import json

    body = getattr(e, "body", None)
    try:
        return json.loads(body)["message"]
    except Exception:
        return getattr(e, "reason", None) or str(e).splitlines()[0]
