"""Pure parts of `capsule image push`: tags, Docker's output, refusals, the digest record."""
from __future__ import annotations

import pytest

from tests.conftest import EXAMPLE
from torchcapsule.config import load_project
from torchcapsule.errors import ImageError
from torchcapsule.image import push as p
from torchcapsule.image.spec import resolve

DIGEST = "sha256:" + "ab" * 32
PUSH_OUT = f"""The push refers to repository [127.0.0.1:5070/acme/digits]
5f70bf18a086: Pushed
c1951ae08c74: Layer already exists
0a1b2c3d4e5f: Mounted from acme/other
2.13.0-cpu-py3.11-slim: digest: {DIGEST} size: 1573
"""


@pytest.fixture
def spec():
    return resolve(load_project(EXAMPLE), flavor="slim")


def test_semantic_tag_under_the_registry_and_latest_only_on_request(spec):
    assert p.remote_tags(spec, "127.0.0.1:5070/acme", latest=False) == [
        "127.0.0.1:5070/acme/digits:2.13.0-cpu-py3.11-slim"]
    assert p.remote_tags(spec, "127.0.0.1:5070/acme", latest=True)[1] == "127.0.0.1:5070/acme/digits:latest-slim"


def test_registry_comes_from_the_flag_else_capsule_yaml_else_one_line(spec):
    assert p.registry_for(spec, "ghcr.io/acme/") == "ghcr.io/acme"
    assert p.registry_for(spec.__class__(**{**spec.__dict__, "registry": "reg.example/x"}), None) == "reg.example/x"
    with pytest.raises(ImageError, match=r"pass --registry HOST/PREFIX .* or set image.registry"):
        p.registry_for(spec, None)
    with pytest.raises(ImageError, match=r"--registry: 'http://x/y' is not HOST\[:PORT\]/PREFIX"):
        p.registry_for(spec, "http://x/y")


def test_digest_and_layer_counts_from_docker_push_output():
    assert p.parse_push(PUSH_OUT) == (DIGEST, 1, 2)
    assert p.parse_push("nothing") == (None, 0, 0)


@pytest.mark.parametrize("out, fix", [
    ('Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused',
     "no registry answers at 127.0.0.1:5999"),
    ("c1951ae08c74: Preparing\nno basic auth credentials", "docker login 127.0.0.1:5999"),
    ("unauthorized: authentication required", "docker login 127.0.0.1:5999"),
])
def test_refusals_are_one_line_with_the_fix(out, fix):
    msg = p.push_failure("127.0.0.1:5999/acme", out)
    assert "\n" not in msg and fix in msg and msg.startswith("push to 127.0.0.1:5999/acme failed: ")


def test_record_round_trips_per_flavor_and_a_broken_one_names_the_fix(tmp_path):
    rec = p.Pushed(pinned=f"r/acme/digits@{DIGEST}", digest=DIGEST, tags=["r/acme/digits:t"], image_id="sha256:1")
    p.write_record(tmp_path, "slim", rec)
    p.write_record(tmp_path, "jupyter-ssh", rec)
    assert p.pinned(tmp_path, "slim") == rec and set(p.read_records(tmp_path)) == {"slim", "jupyter-ssh"}
    assert p.pinned(tmp_path / "nowhere", "slim") is None
    (tmp_path / ".capsule" / "pushed.json").write_text("{")
    with pytest.raises(ImageError, match=r"pushed.json: unreadable .* run `capsule image push` again"):
        p.pinned(tmp_path, "slim")


def _project(tmp_path, registry=None):
    from torchcapsule.config import load_project

    reg = f"  registry: {registry}\n" if registry else ""
    (tmp_path / "capsule.yaml").write_text(f"name: digits\nimage:\n  flavor: slim\n{reg}")
    return load_project(tmp_path / "capsule.yaml")


def test_a_cluster_pulls_the_pushed_digest_and_an_unpushed_image_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(p, "_local_image_id", lambda tag: None)  # no Docker to ask
    project = _project(tmp_path)
    ref, problem = p.pull_ref(project)
    assert ref == "digits:2.13.0-cpu-py3.11-slim"
    assert problem == ("image digits:2.13.0-cpu-py3.11-slim has not been pushed to a registry, so a cluster cannot "
                       "pull it; run `capsule image build --flavor slim` if needed, then "
                       "`capsule image push --flavor slim --registry HOST/PREFIX`")
    with pytest.raises(ImageError, match="has not been pushed"):
        p.require_pushed(project)
    rec = p.Pushed(pinned=f"r.example/acme/digits@{DIGEST}", digest=DIGEST, tags=[], image_id="sha256:1")
    p.write_record(tmp_path, "slim", rec)
    assert p.pull_ref(project) == (rec.pinned, None) and p.require_pushed(project) == rec.pinned


def test_an_image_rebuilt_since_its_push_is_refused(tmp_path, monkeypatch):
    project = _project(tmp_path, registry="r.example/acme")
    rec = p.Pushed(pinned=f"r.example/acme/digits@{DIGEST}", digest=DIGEST, tags=[], image_id="sha256:old")
    p.write_record(tmp_path, "slim", rec)
    monkeypatch.setattr(p, "_local_image_id", lambda tag: "sha256:new")
    ref, problem = p.pull_ref(project)
    assert ref == rec.pinned and "was rebuilt since its last push" in problem
    assert problem.endswith("`capsule image push --flavor slim`")  # image.registry set: no --registry needed


@pytest.mark.parametrize("args", [("serve", "--kubernetes"), ("compose",)])
def test_cluster_exports_refuse_an_unpushed_image_in_one_line(tmp_path, args):
    from tests.conftest import run_capsule

    (tmp_path / "capsule.yaml").write_text("name: neverpushed\nimage: {flavor: slim}\n")
    r = run_capsule("export", *args, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and not r.stdout
    assert "neverpushed:2.13.0-cpu-py3.11-slim has not been pushed" in r.stderr and "capsule image push" in r.stderr


def test_pipeline_on_kubernetes_refuses_an_unpushed_image_before_submitting(tmp_path):
    """`capsule pipeline run --on kubernetes` refuses like `capsule run` does: the first stage
    fails with the one line that names the push command, and nothing is submitted."""
    import json

    from tests.conftest import run_capsule

    (tmp_path / "capsule.yaml").write_text(
        "name: neverpushed\nimage: {flavor: slim}\nstages:\n  test: {run: python -c pass}\n"
        "  train: {run: python -c pass, needs: [test]}\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    r = run_capsule("pipeline", "run", "--on", "kubernetes", "--no-doctor", "--json", cwd=tmp_path,
                    env={"KUBECONFIG": str(kubeconfig)})
    assert r.returncode == 1, r.stderr
    rec = json.loads(r.stdout)
    first, second = rec["stages"][0], rec["stages"][1]
    assert first["state"] == "failed" and first["job_id"] is None
    assert first["reason"].startswith("image neverpushed:2.13.0-cpu-py3.11-slim has not been pushed")
    assert "capsule image push --flavor slim --registry HOST/PREFIX" in first["reason"]
    assert second["state"] == "pending"
