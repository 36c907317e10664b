"""What each export says (structure); schema validation of the same files is in
tests/integration/test_exports_validate.py."""
from __future__ import annotations

import ast

import pytest
import yaml

from torchcapsule.config import load_project, parse_project
from torchcapsule.errors import ConfigError
from torchcapsule.pipeline.exports import airflow, compose, cronjob, github, gitlab, k8s_serve

from ..conftest import EXAMPLE

GPU_PROJECT = """
name: vision
image: {torch: "2.13.0", cuda: "13.0", user: {name: ml, uid: 1234}}  # 13.0: valid before and after the doctor branch's matrix update
stages:
  test: {run: python -m pytest -q}
  train:
    run: train.py
    needs: [test]
    resources: {gpus: "H100:4", shm_size: 8Gi}
registry: {tracking_uri: "http://mlflow.internal:5000"}
schedule: {cron: "@daily", timezone: Europe/Paris}
targets:
  kubernetes:
    namespace: vision
    node_selector: {nvidia.com/gpu.product: H100}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    pvc: {logs: vision-logs, models: vision-models}
"""


@pytest.fixture(scope="module")
def digits():
    return load_project(EXAMPLE / "capsule.yaml")


@pytest.fixture(scope="module")
def gpu():
    return parse_project(GPU_PROJECT, "capsule.yaml")


def _pod(cj):
    return cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_runs_the_pipeline_on_the_schedule_non_root(digits):
    cj = cronjob.render(digits)
    assert cj["kind"] == "CronJob" and cj["spec"]["schedule"] == "0 3 * * 1" and cj["spec"]["timeZone"] == "UTC"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod(cj)
    ctr = pod["containers"][0]
    assert ctr["command"] == ["capsule", "pipeline", "run", "--on", "local"]
    assert ctr["image"] == "digits:2.13.0-cpu-py3.11-jupyter-ssh"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert "resources" not in ctr  # CPU project: no GPU limit
    assert "nodeSelector" not in pod
    assert {m["mountPath"] for m in ctr["volumeMounts"]} >= {"/workspace/logs", "/dev/shm"}


def test_cronjob_gpu_project_asks_for_the_largest_stage_and_persists_logs(gpu):
    cj = cronjob.render(gpu)
    pod = _pod(cj)
    ctr = pod["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"][0]["operator"] == "Exists"
    assert cj["spec"]["schedule"] == "0 0 * * *" and cj["spec"]["timeZone"] == "Europe/Paris"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["logs"]["persistentVolumeClaim"]["claimName"] == "vision-logs"
    assert vols["data"] == {"name": "data", "emptyDir": {}}
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.internal:5000"} in ctr["env"]
    assert cj["metadata"]["namespace"] == "vision"


def test_missing_schedule_is_a_one_line_error(digits):
    p = digits.model_copy(update={"schedule": None})
    for fn in (cronjob.render, lambda q: github.scheduled(q), lambda q: airflow.text(q)):
        with pytest.raises(ConfigError, match=r"schedule: missing; `capsule export \w+` needs schedule.cron"):
            fn(p)


def test_invalid_cron_in_capsule_yaml_names_the_field():
    with pytest.raises(ConfigError, match=r"capsule.yaml:3: schedule.cron: '0 25 \* \* \*': hour 25 is out of range"):
        parse_project("name: x\nschedule:\n  cron: '0 25 * * *'\n", "capsule.yaml")


def test_github_schedule_workflow(digits, gpu):
    wf = github.scheduled(digits)
    assert wf["on"]["schedule"] == [{"cron": "0 3 * * 1"}]
    job = wf["jobs"]["pipeline"]
    assert job["runs-on"] == "ubuntu-latest" and job["container"]["image"].startswith("digits:")
    assert job["steps"][1]["run"] == "capsule pipeline run --on local"
    g = github.scheduled(gpu)
    # GitHub refuses @daily: the macro is spelled out; the timezone is kept
    assert g["on"]["schedule"] == [{"cron": "0 0 * * *", "timezone": "Europe/Paris"}]
    assert "gpu" in g["jobs"]["pipeline"]["runs-on"]
    assert "--gpus all" in g["jobs"]["pipeline"]["container"]["options"]
    assert f"--shm-size {8 * 2**30}" in g["jobs"]["pipeline"]["container"]["options"]
    # `on` stays a string key (unquoted, YAML 1.1 readers would turn it into True)
    assert "on" in yaml.safe_load(github.text(wf, "github"))


def test_github_ci_tests_on_every_push_and_runs_the_pipeline_on_main(digits, gpu):
    wf = github.ci(digits)
    assert set(wf["on"]) == {"push", "pull_request", "workflow_dispatch"}
    test = wf["jobs"]["test"]
    assert test["steps"][-1]["run"] == "capsule pipeline run --on local --only test"
    assert test["runs-on"] == "ubuntu-latest"
    pipe = wf["jobs"]["pipeline"]
    assert pipe["needs"] == "test" and "default_branch" in pipe["if"] and "push" in pipe["if"]
    # GPU runner only where the stage asks for GPUs: the test stage of `gpu` asks for none
    g = github.ci(gpu)
    assert g["jobs"]["test"]["runs-on"] == "ubuntu-latest"
    assert "gpu" in g["jobs"]["pipeline"]["runs-on"]
    gpu_test = gpu.model_copy(update={"stages": {**gpu.stages, "test": gpu.stages["train"].model_copy(
        update={"needs": ()})}})
    assert "gpu" in github.ci(gpu_test)["jobs"]["test"]["runs-on"]
    with pytest.raises(ConfigError, match="no stage 'unit'"):
        github.ci(digits, test_stage="unit")


def test_gitlab_ci(digits, gpu):
    doc = gitlab.ci(digits)
    assert doc["default"]["image"].startswith("digits:")
    assert doc["test"]["script"] == ["capsule pipeline run --on local --only test"]
    assert {"if": "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"} in doc["pipeline"]["rules"]
    assert "tags" not in doc["test"]
    assert gitlab.ci(gpu)["pipeline"]["tags"] == ["gpu"]


def test_serve_deployment_probes_gpu_limits_non_root(digits, gpu):
    dep, svc, hpa = k8s_serve.render(digits)
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "nvidia.com/gpu" not in ctr["resources"]["limits"]
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    gdep = k8s_serve.render(gpu, replicas=2, max_replicas=8)[0]
    gctr = gdep["spec"]["template"]["spec"]["containers"][0]
    assert gctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gdep["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert k8s_serve.render(gpu, replicas=2, max_replicas=8)[2]["spec"]["maxReplicas"] == 8


def test_compose_dev_serve_mlflow(digits, gpu):
    doc = compose.render(digits)
    assert set(doc["services"]) == {"dev", "serve", "mlflow"}
    serve = doc["services"]["serve"]
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert all(p.startswith("127.0.0.1:") for s in doc["services"].values() for p in s["ports"])
    assert "deploy" not in serve
    # the project image never runs as root and never gains privileges (docs/image.md, threat model)
    dev = doc["services"]["dev"]
    for svc in (dev, serve):
        assert svc["user"] == "1000:1000"
        assert svc["security_opt"] == ["no-new-privileges:true"] and svc["cap_drop"] == ["ALL"]
    assert dev["tmpfs"] == ["/run/capsule:mode=0700,uid=1000,gid=1000"] and "HOST_UID" not in dev["environment"]
    assert "127.0.0.1:2222:2222" in dev["ports"]
    g = compose.render(gpu)  # a remote registry: no local MLflow server
    assert set(g["services"]) == {"dev", "serve"}
    assert g["services"]["dev"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4


@pytest.mark.parametrize("operator", ["docker", "kubernetes"])
def test_airflow_dag_is_python_with_the_schedule(digits, gpu, operator):
    for p in (digits, gpu):
        src = airflow.text(p, operator=operator, project_dir="/srv/proj")
        tree = ast.parse(src)
        imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "airflow.sdk" in imports
        assert "capsule', 'pipeline', 'run'" in src or "capsule pipeline run" in src
    src = airflow.text(gpu, operator="docker", project_dir="/srv/proj")
    assert "schedule='0 0 * * *'" in src and "tz='Europe/Paris'" in src and "--gpus all" in src
    assert "-v /srv/proj:/workspace" in src


def test_exported_yaml_has_a_header_and_no_anchors(digits):
    text = cronjob.text(digits)
    assert text.startswith("# Generated by `capsule export cronjob`")
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text)["kind"] == "CronJob"


@pytest.mark.parametrize("args", [("export", "cronjob"), ("export", "ci", "--github"), ("pipeline", "--help")])
def test_export_and_pipeline_cli_import_nothing_heavy(args):
    from .test_cli import HEAVY, _imported

    mods = _imported(*args, *(("-f", str(EXAMPLE / "capsule.yaml")) if args[0] == "export" else ()))
    assert not (mods & set(HEAVY)), mods & set(HEAVY)
