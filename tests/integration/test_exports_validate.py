"""Exports checked by the real validators: Kubernetes manifests against the official OpenAPI
schemas (kubernetes-validate, strict), GitHub/GitLab/compose files against the schemastore and
compose-spec JSON schemas (vendored by check-jsonschema), `docker compose config` when the
compose plugin exists, and the Airflow DAG imported by a real Airflow 3 (.venv-airflow)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from torchcapsule.config import load_project, parse_project

from ..conftest import EXAMPLE, REPO, missing_part, run_capsule, write_pushed
from ..unit.test_exports import GPU_PROJECT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """The digits example and a GPU project, each with a recorded push (the cluster exports name
    the image by digest and refuse an unpushed one)."""
    gpu_dir = tmp_path_factory.mktemp("gpu")
    (gpu_dir / "capsule.yaml").write_text(GPU_PROJECT)
    digits_dir = tmp_path_factory.mktemp("digits")
    # Renamed: no local image has its tag, so a concurrent rebuild of digits' own image (another
    # test, another user of the engine) cannot make the recorded push look stale.
    text = (EXAMPLE / "capsule.yaml").read_text()
    (digits_dir / "capsule.yaml").write_text(text.replace("\nname: digits\n", "\nname: digits-export\n", 1))
    for d in (gpu_dir, digits_dir):
        write_pushed(d, load_project(d / "capsule.yaml").image.flavor)
    return {"digits": digits_dir, "gpu": gpu_dir}


def _export(project_dir: Path, *args: str) -> str:
    r = run_capsule("export", *args, "-f", str(project_dir / "capsule.yaml"), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def k8s_validate():
    try:
        import kubernetes_validate
    except ImportError:
        missing_part("kubernetes-validate is not installed; pip install -e '.[dev]'")
    return kubernetes_validate


@pytest.mark.parametrize("name", ["digits", "gpu"])
@pytest.mark.parametrize("args, kinds", [
    (("cronjob",), ["CronJob"]),
    (("serve", "--kubernetes"), ["Deployment", "Service", "HorizontalPodAutoscaler"]),
])
def test_kubernetes_manifests_validate_strictly(k8s_validate, projects, name, args, kinds):
    docs = [d for d in yaml.safe_load_all(_export(projects[name], *args)) if d]
    assert [d["kind"] for d in docs] == kinds
    if args[0] == "serve":  # a cluster pulls the pushed image by digest
        image = docs[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("registry.example/acme/") and "@sha256:" in image, image
    version = k8s_validate.latest_version()
    for d in docs:
        k8s_validate.validate(d, version, strict=True)  # raises on any schema error


def test_kubernetes_validator_rejects_a_broken_manifest(k8s_validate, projects):
    """The check above can fail: a misspelled field is refused under strict."""
    doc = yaml.safe_load(_export(projects["digits"], "cronjob"))
    doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(Exception):
        k8s_validate.validate(doc, k8s_validate.latest_version(), strict=True)


def _check_jsonschema(schema: str, file: Path) -> subprocess.CompletedProcess:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        missing_part("check-jsonschema is not installed; pip install -e '.[dev]'")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", f"vendor.{schema}", str(file)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["digits", "gpu"])
@pytest.mark.parametrize("args, schema, fname", [
    (("github",), "github-workflows", "retrain.yml"),
    (("ci", "--github"), "github-workflows", "ci.yml"),
    (("ci", "--gitlab"), "gitlab-ci", ".gitlab-ci.yml"),
    (("compose",), "compose-spec", "compose.yaml"),
])
def test_ci_and_compose_files_validate_against_their_schemas(projects, tmp_path, name, args, schema, fname):
    out = tmp_path / fname
    r = run_capsule("export", *args, "-f", str(projects[name] / "capsule.yaml"), "-o", str(out))
    assert r.returncode == 0 and out.is_file(), r.stderr
    if args == ("compose",):
        assert all("@sha256:" in svc["image"] for n, svc in yaml.safe_load(out.read_text())["services"].items()
                   if n != "mlflow")
    r = _check_jsonschema(schema, out)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_check_rejects_a_broken_workflow(projects, tmp_path):
    doc = yaml.safe_load(_export(projects["digits"], "github"))
    doc["jobs"]["pipeline"]["runs_on"] = doc["jobs"]["pipeline"].pop("runs-on")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(doc))
    assert _check_jsonschema("github-workflows", bad).returncode != 0


# `docker compose config` is not run: Compose v2 has no Debian 12 package and cannot be fetched
# here, and Debian's Compose v1 (1.29) predates the compose spec's top-level `name`. The file is
# validated against the compose-spec JSON schema above instead (docs/pipeline.md says so).


AIRFLOW_PY = REPO / ".venv-airflow" / "bin" / "python"

DAGBAG = """
import json, sys
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {"tasks": [t.task_id for t in dag.tasks], "schedule": str(getattr(dag, "schedule", "")),
                           "operators": [type(t).__name__ for t in dag.tasks]}
    for t in dag.tasks:
        if hasattr(t, "build_pod_request_obj"):  # the pod KubernetesPodOperator would create
            from kubernetes.client import ApiClient
            out["dags"][dag_id]["pod"] = ApiClient().sanitize_for_serialization(t.build_pod_request_obj())
print("RESULT " + json.dumps(out))
"""


# KubernetesPodOperator builds its pod only with a kube config at hand; this one points nowhere
# (nothing is contacted: the pod is built, not submitted).
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@pytest.mark.parametrize("operator, op_class", [("docker", "BashOperator"), ("kubernetes", "KubernetesPodOperator")])
def test_airflow_dag_imports_in_real_airflow_3(projects, tmp_path, operator, op_class, k8s_validate):
    if not AIRFLOW_PY.is_file():
        missing_part(f"{AIRFLOW_PY} missing; run scripts/setup-airflow.sh")
    dags = tmp_path / "dags"
    dags.mkdir()
    for name in ("digits", "gpu"):
        (dags / f"{name}_pipeline.py").write_text(_export(projects[name], "airflow", "--operator", operator))
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__UNIT_TEST_MODE": "True", "PYTHONPATH": "", "KUBECONFIG": str(tmp_path / "kubeconfig")}
    r = subprocess.run([str(AIRFLOW_PY), "-c", DAGBAG, str(dags)], capture_output=True, text=True, env=env,
                       timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(line.removeprefix("RESULT "))
    assert res["errors"] == {}
    assert set(res["dags"]) == {"digits_export_pipeline", "vision_pipeline"}
    for d in res["dags"].values():
        assert d["tasks"] == ["capsule_pipeline_run"] and d["operators"] == [op_class]
    assert "0 3 * * 1" in res["dags"]["digits_export_pipeline"]["schedule"]
    if operator == "kubernetes":  # the pod Airflow would submit: valid, non-root, GPUs, volumes
        for d in res["dags"].values():
            k8s_validate.validate(d["pod"], k8s_validate.latest_version(), strict=True)
            assert d["pod"]["spec"]["securityContext"]["runAsNonRoot"] is True
            assert d["pod"]["spec"]["containers"][0]["command"] == ["capsule", "pipeline", "run", "--on", "local"]
        gpod = res["dags"]["vision_pipeline"]["pod"]["spec"]
        assert gpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in gpod["volumes"]}
        assert claims["logs"] == "vision-logs"


def test_airflow_reports_a_broken_dag(projects, tmp_path):
    """The import check above can fail: a DAG with a bad schedule is an import error."""
    if not AIRFLOW_PY.is_file():
        missing_part(f"{AIRFLOW_PY} missing; run scripts/setup-airflow.sh")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "bad.py").write_text(_export(projects["digits"], "airflow").replace("'0 3 * * 1'", "'0 99 * * 1'"))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "PYTHONPATH": ""}
    r = subprocess.run([str(AIRFLOW_PY), "-c", DAGBAG, str(dags)], capture_output=True, text=True, env=env, timeout=300)
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))
    assert res["errors"] and not res["dags"]
