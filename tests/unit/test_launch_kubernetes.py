"""Kubernetes backend: manifests (pure) and the submit/status/logs/cancel path against a fake of
the official client's API objects. No cluster runs here; every fake method is checked to exist,
with the same keyword arguments, on the real client class, so the fakes cannot drift."""
from __future__ import annotations

import inspect
import json
from dataclasses import replace
from datetime import datetime, timezone

import pytest
import urllib3

from tests.conftest import EXAMPLE, REPO
from torchcapsule.config import KubernetesTarget, load_project
from torchcapsule.errors import BackendError, JobNotFound
from torchcapsule.launch.api import JobState
from torchcapsule.launch.kubernetes import (
    CANCELLED, GPU_PRODUCTS, JOB_LABEL, Apis, KubernetesBackend, gpu_placement, job_status, manifests,
    terminated,
)
from torchcapsule.launch.spec import job_spec

kclient = pytest.importorskip("kubernetes.client")
from kubernetes.client.exceptions import ApiException  # noqa: E402


@pytest.fixture(scope="module")
def project():
    return load_project(EXAMPLE)


def _pod(docs):
    return docs[0]["spec"]["template"]["spec"]


# -- manifests -------------------------------------------------------------------------------
def test_one_node_is_a_single_job_with_resources_shm_and_non_root(project):
    spec = job_spec(project, "train", gpus=2)
    docs = manifests(spec, project.targets.kubernetes, "digits-train-abc")
    assert [d["kind"] for d in docs] == ["Job"]
    job = docs[0]
    assert job["metadata"]["namespace"] == "ml" and job["metadata"]["labels"][JOB_LABEL] == "digits-train-abc"
    pod = _pod(docs)
    c = pod["containers"][0]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2, "memory": "4Gi"},
                              "requests": {"cpu": "2", "memory": "4Gi"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "torchcapsule.launch.torchrun"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "localhost:0"


def test_two_nodes_indexed_job_and_headless_service(project):
    spec = job_spec(project, "train", nodes=2)
    docs = manifests(spec, project.targets.kubernetes, "digits-train-abc")
    assert [d["kind"] for d in docs] == ["Job", "Service"]
    job, svc = docs
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert _pod(docs)["subdomain"] == "digits-train-abc"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {JOB_LABEL: "digits-train-abc"}
    cmd = _pod(docs)["containers"][0]["command"]
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "digits-train-abc-0.digits-train-abc:29500"
    assert cmd[cmd.index("--nnodes") + 1] == "2"


def test_pvcs_affinity_secrets_and_non_ddp_retries(project):
    target = KubernetesTarget(namespace="x", pvc={"models": "models-pvc", "data": "data-pvc"},
                              image_pull_secrets=("regcred",), service_account="trainer",
                              affinity={"podAntiAffinity": {}})
    spec = replace(job_spec(project, "test"), retries=3)
    docs = manifests(spec, target, "digits-test-abc")
    pod = _pod(docs)
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models-pvc"}} in pod["volumes"]
    assert {"name": "models", "mountPath": "/models"} in pod["containers"][0]["volumeMounts"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["serviceAccountName"] == "trainer"
    assert pod["affinity"] == {"podAntiAffinity": {}}
    assert docs[0]["spec"]["backoffLimit"] == 3
    assert pod["containers"][0]["command"] == ["python", "-m", "pytest", "-q", "tests"]


def test_kubeflow_pytorchjob(project):
    target = KubernetesTarget(operator="kubeflow")
    docs = manifests(job_spec(project, "train", nodes=3), target, "digits-train-abc")
    assert [d["kind"] for d in docs] == ["PyTorchJob"]
    spec = docs[0]["spec"]
    assert spec["nprocPerNode"] == "2"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    c = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and "--rdzv_endpoint" not in c["command"]  # the operator sets PET_*


def test_gpu_type_mapping_and_refusals(project):
    h100 = KubernetesTarget(node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    from torchcapsule.config import parse_gpus

    assert gpu_placement(parse_gpus("H100:8"), h100) == ({}, [])
    with pytest.raises(BackendError, match="pins nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3, which is not a A100"):
        gpu_placement(parse_gpus("A100:1"), h100)
    assert gpu_placement(parse_gpus("L4:1"), KubernetesTarget()) == ({"nvidia.com/gpu.product": "NVIDIA-L4"}, [])
    assert gpu_placement(parse_gpus("H100:1"), KubernetesTarget()) == ({}, list(GPU_PRODUCTS["H100"]))
    with pytest.raises(BackendError, match="no known nvidia.com/gpu.product label for RTX4090"):
        gpu_placement(parse_gpus("RTX4090:1"), KubernetesTarget())
    docs = manifests(job_spec(project, "train", gpus="H100:1"), KubernetesTarget(), "j")
    terms = _pod(docs)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == list(GPU_PRODUCTS["H100"])


# -- state mapping ---------------------------------------------------------------------------
def _job(conditions=(), active=0, ready=0, annotations=None):
    return {"metadata": {"name": "j", "annotations": annotations or {}},
            "status": {"conditions": [{"type": t, "status": "True", "message": m} for t, m in conditions],
                       "active": active, "ready": ready, "startTime": "2026-11-27T10:00:00Z"}}


def _pods(*codes):
    return [{"metadata": {"name": f"p{i}", "creationTimestamp": f"2026-11-27T10:00:0{i}Z"},
             "status": {"phase": "Failed" if c else "Succeeded",
                        "containerStatuses": [{"state": {"terminated": {"exitCode": c}}}]}}
            for i, c in enumerate(codes)]


def test_job_status_table():
    assert job_status(_job(), [], "k:ns/j").state is JobState.PENDING
    assert job_status(_job(active=1, ready=1), [], "k:ns/j").state is JobState.RUNNING
    ok = job_status(_job([("Complete", None)]), _pods(0), "k:ns/j")
    assert (ok.state, ok.exit_code) == (JobState.SUCCEEDED, 0)
    bad = job_status(_job([("Failed", "BackoffLimitExceeded")]), _pods(0, 3), "k:ns/j")
    assert (bad.state, bad.exit_code, bad.reason) == (JobState.FAILED, 3, "BackoffLimitExceeded; exited with code 3")
    gone = job_status(_job([("Suspended", None)], annotations={CANCELLED: "true"}), [], "k:ns/j")
    assert gone.state is JobState.CANCELLED
    # A failure whose pods were never seen is FAILED with no exit code, never 0.
    assert job_status(_job([("Failed", "x")]), _pods(0), "k:ns/j").exit_code is None


def test_exit_code_prefers_a_failure():
    assert terminated(_pods(0, 137, 0))[0] == 137 and terminated(_pods(0)) == (0, "") and terminated([]) == (None, "")


# -- the client path, against fakes of the real API classes --------------------------------------
class FakeBatch:
    def __init__(self):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, dict]] = []

    def create_namespaced_job(self, namespace, body, **kw):
        self.calls.append(("create_namespaced_job", {"namespace": namespace, "body": body}))
        if namespace == "missing":
            raise ApiException(status=404, reason="Not Found")
        self.jobs[(namespace, body["metadata"]["name"])] = json.loads(json.dumps(body))
        return body

    def read_namespaced_job(self, name, namespace, **kw):
        try:
            return self.jobs[(namespace, name)]
        except KeyError:
            e = ApiException(status=404, reason="Not Found")
            e.body = json.dumps({"message": f'jobs.batch "{name}" not found'})
            raise e from None

    def patch_namespaced_job(self, name, namespace, body, **kw):
        self.calls.append(("patch_namespaced_job", {"name": name, "body": body}))
        job = self.read_namespaced_job(name, namespace)
        job["metadata"].setdefault("annotations", {}).update(body["metadata"]["annotations"])
        job["spec"].update(body["spec"])
        job["status"] = {"conditions": [{"type": "Suspended", "status": "True"}]}
        return job

    def list_namespaced_job(self, namespace, **kw):
        return {"items": [j for (ns, _), j in self.jobs.items() if ns == namespace]}

    def list_job_for_all_namespaces(self, label_selector=None, **kw):
        return {"items": list(self.jobs.values())}


class FakeCore:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_namespaced_service(self, namespace, body, **kw):
        self.calls.append(("create_namespaced_service", {"namespace": namespace, "body": body}))
        return body

    def list_namespaced_pod(self, namespace, label_selector=None, **kw):
        self.calls.append(("list_namespaced_pod", {"label_selector": label_selector}))
        return {"items": [{"metadata": {"name": "digits-train-abc-0-xyz",
                                        "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                           "status": {"phase": "Running"}}]}

    def read_namespaced_pod_log(self, name, namespace, follow=False, tail_lines=None, _preload_content=True, **kw):
        self.calls.append(("read_namespaced_pod_log", {"name": name, "follow": follow}))
        text = "[rank0]:epoch 1/30\n[rank0]:epoch 2/30\n"
        if _preload_content:
            return text

        class Resp:
            def stream(self):
                yield text[:10].encode()
                yield text[10:].encode()
        return Resp()


class FakeCustom:
    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        self.created = body
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        if getattr(self, "created", None) and self.created["metadata"]["name"] == name:
            return {**self.created, "status": {"conditions": [{"type": "Running", "status": "True"}]}}
        raise ApiException(status=404, reason="Not Found")


def test_fakes_match_the_real_client():
    pairs = [(FakeBatch, kclient.BatchV1Api), (FakeCore, kclient.CoreV1Api), (FakeCustom, kclient.CustomObjectsApi)]
    for fake, real in pairs:
        for name, fn in inspect.getmembers(fake, inspect.isfunction):
            if name.startswith("_"):
                continue
            assert hasattr(real, name), f"{real.__name__} has no {name}"
            real_params = set(inspect.signature(getattr(real, name)).parameters)
            ours = {p for p in inspect.signature(fn).parameters if p not in ("self", "kw")}
            positional = ours - {"follow", "tail_lines", "_preload_content", "label_selector"}
            assert positional <= real_params, (name, positional - real_params)


@pytest.fixture
def backend(project):
    return KubernetesBackend(project, apis=Apis(FakeBatch(), FakeCore(), FakeCustom()))


def test_submit_creates_job_then_status_logs_cancel(backend, project):
    job_id = backend.submit(job_spec(project, "train"))
    ns, name = job_id.removeprefix("kubernetes:").split("/")
    assert ns == "ml" and name.startswith("digits-train-")
    (call, args), = backend.apis.batch.calls
    assert call == "create_namespaced_job" and args["namespace"] == "ml" and args["body"]["kind"] == "Job"
    backend.apis.batch.jobs[(ns, name)]["status"] = {"active": 1, "ready": 1}
    assert backend.status(job_id).state is JobState.RUNNING
    assert ("list_namespaced_pod", {"label_selector": f"{JOB_LABEL}={name}"}) in backend.apis.core.calls
    assert list(backend.logs(job_id)) == ["[rank0]:epoch 1/30", "[rank0]:epoch 2/30"]
    assert list(backend.logs(job_id, follow=True)) == ["[rank0]:epoch 1/30", "[rank0]:epoch 2/30"]
    backend.cancel(job_id)
    patch = [a for c, a in backend.apis.batch.calls if c == "patch_namespaced_job"][0]
    assert patch["body"] == {"metadata": {"annotations": {CANCELLED: "true"}}, "spec": {"suspend": True}}
    assert backend.status(job_id).state is JobState.CANCELLED
    assert [s.job_id for s in backend.list()] == [job_id]
    anywhere = KubernetesBackend(apis=backend.apis)  # `capsule jobs list` outside a project
    assert [s.job_id for s in anywhere.list()] == [job_id]


def test_two_nodes_creates_the_service_too(backend, project):
    backend.submit(job_spec(project, "train", nodes=2))
    assert [c for c, _ in backend.apis.core.calls] == ["create_namespaced_service"]


def test_kubeflow_submits_a_custom_object(project):
    p = project.model_copy(update={"targets": project.targets.model_copy(
        update={"kubernetes": KubernetesTarget(namespace="ml", operator="kubeflow")})})
    custom = FakeCustom()
    b = KubernetesBackend(p, apis=Apis(FakeBatch(), FakeCore(), custom))
    job_id = b.submit(job_spec(p, "train", nodes=2))
    assert custom.created["kind"] == "PyTorchJob"
    # `capsule jobs status` runs without the project: it still finds the PyTorchJob.
    anywhere = KubernetesBackend(apis=b.apis)
    assert anywhere.status(job_id).state is JobState.RUNNING
    with pytest.raises(JobNotFound, match='jobs.batch "nope" not found'):
        anywhere.status("kubernetes:ml/nope")


def test_errors_are_one_line_with_fix(backend, project):
    with pytest.raises(JobNotFound, match=r'jobs.batch "nope" not found.*capsule jobs list') as e:
        backend.status("kubernetes:ml/nope")
    assert "\n" not in str(e.value)
    with pytest.raises(JobNotFound, match="kubernetes:NAMESPACE/NAME"):
        backend.status("kubernetes:nope")
    b = KubernetesBackend(project, target=KubernetesTarget(namespace="missing"),
                          apis=Apis(FakeBatch(), FakeCore(), FakeCustom()))
    with pytest.raises(BackendError, match="create the namespace"):
        b.submit(job_spec(project, "train"))

    class Down(FakeBatch):
        def read_namespaced_job(self, name, namespace, **kw):
            raise urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1", "Connection refused")
    b = KubernetesBackend(project, apis=Apis(Down(), FakeCore(), FakeCustom()))
    with pytest.raises(BackendError, match="cannot reach the Kubernetes API"):
        b.status("kubernetes:ml/j")


def test_no_kubeconfig_is_one_line_with_fix(project, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError, match=r"no kubeconfig at .*nope; point KUBECONFIG") as e:
        KubernetesBackend(project).submit(job_spec(project, "train"))
    assert "\n" not in str(e.value)


def test_broken_kubeconfig_is_one_line(project, monkeypatch, tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError, match=r"^kubeconfig: .*targets.kubernetes.context") as e:
        KubernetesBackend(project).submit(job_spec(project, "train"))
    assert "\n" not in str(e.value)


# -- a failed rank's own exit code, from a recorded failure ------------------------------------------
def test_failed_rank_reports_its_own_exit_code_not_torchruns():
    """Both pods' torchrun exited 1; the second pod's termination message (the end of its log)
    names rank 3 and its code 7, which the job reports, with the node it ran on."""
    rec = json.loads((REPO / "tests" / "fixtures" / "kubernetes" / "failed_rank_two_nodes.json").read_text())
    st = job_status(rec["job"], rec["pods"], "kubernetes:ml/digits-train-abc")
    assert (st.state, st.exit_code) == (JobState.FAILED, 7)
    first = st.reason.splitlines()[0]
    assert first == ("Job has reached the specified backoff limit; rank 3 failed with exit code 7 on "
                     "digits-train-abc-1.digits-train-abc.ml.svc.cluster.local")
    assert "  exitcode  : 7 (pid: 61)" in st.reason.splitlines()[1:]  # the end of the failed pod's log follows
    assert st.started_at == datetime(2026, 12, 2, 6, 29, 58, tzinfo=timezone.utc).timestamp()
    # The same pods under a Kubeflow PyTorchJob: the same explanation.
    ptj = {"kind": "PyTorchJob", "metadata": {"name": "digits-train-abc"},
           "status": {"conditions": [{"type": "Running", "status": "False"},
                                     {"type": "Failed", "status": "True", "message": "PyTorchJob digits-train-abc is failed"}]}}
    assert job_status(ptj, rec["pods"], "kubernetes:ml/digits-train-abc").exit_code == 7
    # Without the messages there is only the pods' worst code, torchrun's 1, and the reason says just that.
    plain = [{**p, "status": {**p["status"], "containerStatuses": [
        {**cs, "state": {"terminated": {k: v for k, v in cs["state"]["terminated"].items() if k != "message"}}}
        for cs in p["status"]["containerStatuses"]]}} for p in rec["pods"]]
    assert job_status(rec["job"], plain, "k:x").reason == "Job has reached the specified backoff limit; exited with code 1"


def test_pods_keep_the_end_of_a_failed_log_as_their_message(project):
    c = _pod(manifests(job_spec(project, "train"), project.targets.kubernetes, "j"))["containers"][0]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_cancel_keeps_a_finished_jobs_outcome_and_ids_name_their_backend(backend, project):
    job_id = backend.submit(job_spec(project, "train"))
    ns, name = job_id.removeprefix("kubernetes:").split("/")
    backend.apis.batch.jobs[(ns, name)]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    assert backend.cancel(job_id).state is JobState.SUCCEEDED  # Backend.cancel: looked up, finished
    assert "patch_namespaced_job" not in [c for c, _ in backend.apis.batch.calls]
    with pytest.raises(JobNotFound, match="'slurm:42' is a slurm job, not a kubernetes one"):
        backend.status("slurm:42")
