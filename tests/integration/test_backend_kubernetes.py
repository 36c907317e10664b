"""Kubernetes: no cluster can run on these machines, so every manifest that
`capsule run --on kubernetes --dry-run` prints for the example is validated against the official
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors) of the newest
release the installed package ships. The submit path is covered by tests/unit/test_launch_kubernetes.py."""
from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import EXAMPLE, run_capsule

kv = pytest.importorskip("kubernetes_validate")


def newest_release() -> str:
    return kv.utils.latest_version()


def _docs(*args: str, cwd=EXAMPLE) -> list[dict]:
    r = run_capsule("run", "train", "--on", "kubernetes", "--dry-run", *args, cwd=cwd, check=True)
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def test_schemas_are_of_a_current_release():
    major, minor = map(int, newest_release().split(".")[:2])
    assert (major, minor) >= (1, 33), newest_release()


@pytest.mark.parametrize("args,kinds", [
    ((), ["Job"]),
    (("--nodes", "2"), ["Job", "Service"]),
    (("--nodes", "2", "--gpus", "H100:8"), ["Job", "Service"]),
    (("--gpus", "1"), ["Job"]),
])
def test_dry_run_manifests_validate_strictly(args, kinds):
    docs = _docs(*args)
    assert [d["kind"] for d in docs] == kinds
    version = newest_release()
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError with the failing path
    pod = docs[0]["spec"]["template"]["spec"]
    # The example's targets.kubernetes: node selector and tolerations reach the pod.
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_strict_validation_would_catch_a_typo():
    """The check above can fail: a misspelt field is rejected by the same schemas."""
    doc = _docs()[0]
    doc["spec"]["template"]["spec"]["containers"][0]["workdir"] = "/x"  # not workingDir
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, newest_release(), strict=True)


def test_validates_with_node_selector_tolerations_affinity_and_pvcs(tmp_path):
    text = (EXAMPLE / "capsule.yaml").read_text()
    extra = ("    affinity:\n      nodeAffinity:\n        preferredDuringSchedulingIgnoredDuringExecution:\n"
             "          - weight: 1\n            preference:\n              matchExpressions:\n"
             "                - {key: zone, operator: In, values: [a]}\n"
             "    pvc: {models: models-claim, data: data-claim}\n"
             "    image_pull_secrets: [regcred]\n")
    text = re.sub(r"(    tolerations:\n(?:      .*\n)+)", lambda m: m.group(1) + extra, text)
    text = text.replace("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB")
    (tmp_path / "capsule.yaml").write_text(text)
    for args in ((), ("--nodes", "3", "--gpus", "A100:4")):
        docs = _docs(*args, cwd=tmp_path)
        for doc in docs:
            kv.validate(doc, newest_release(), strict=True)
        pod = docs[0]["spec"]["template"]["spec"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "models-claim"}} in pod["volumes"]
        assert "nodeAffinity" in pod["affinity"]


def test_gpu_type_the_target_cannot_provide_is_one_line():
    r = run_capsule("run", "train", "--on", "kubernetes", "--dry-run", "--gpus", "A100:1", cwd=EXAMPLE)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "pins nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in r.stderr


def test_no_kubeconfig_is_one_line(tmp_path):
    r = run_capsule("run", "train", "--on", "kubernetes", cwd=EXAMPLE,
                    env={"KUBECONFIG": str(tmp_path / "none"), "KUBERNETES_SERVICE_HOST": ""})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "point KUBECONFIG" in r.stderr


def test_the_job_names_the_pushed_image_by_digest_and_an_unpushed_one_is_refused(tmp_path):
    """Dry run of an unpushed image: the manifest (with the tag) and a note of the refusal; a real
    submission: refused in one line with the command that fixes it; once pushed: the digest."""
    import shutil

    from tests.conftest import write_pushed

    proj = tmp_path / "digits"
    shutil.copytree(EXAMPLE, proj, ignore=shutil.ignore_patterns(".capsule", "models", "logs", "data"))
    text = (proj / "capsule.yaml").read_text()
    (proj / "capsule.yaml").write_text(text.replace("\nname: digits\n", "\nname: digits-k8s\n", 1))
    r = run_capsule("run", "train", "--on", "kubernetes", "--dry-run", cwd=proj, check=True)
    assert "image: digits-k8s:2.13.0-cpu-py3.11-jupyter-ssh" in r.stdout
    assert "note: a real submission would be refused: image digits-k8s:2.13.0-cpu-py3.11-jupyter-ssh has not " \
           "been pushed" in r.stderr
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    r = run_capsule("run", "train", "--on", "kubernetes", cwd=proj, env={"KUBECONFIG": str(kubeconfig)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "has not been pushed" in r.stderr and "capsule image push --flavor jupyter-ssh" in r.stderr
    pinned = write_pushed(proj, "jupyter-ssh")
    docs = _docs("--nodes", "2", cwd=proj)
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["image"] == pinned
    for d in docs:
        kv.validate(d, newest_release(), strict=True)
