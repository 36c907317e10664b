"""`capsule image push` against real registries (scripts/start-registry.sh, started by
scripts/start-services.sh): an open one on 127.0.0.1:5070, one requiring credentials on :5071.

The image pushed is a small one built here from the local Debian base under the project's own
semantic tag, so the test is about the push, not about building torch."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest

from tests.conftest import missing_part, run_capsule
from tests.integration.image_fixtures import docker, ensure_base_image
from torchcapsule._util import free_port

REGISTRY = "127.0.0.1:5070"
AUTH_REGISTRY = "127.0.0.1:5071"


def _answers(hostport: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{hostport}/v2/", timeout=10)
        return True
    except urllib.error.HTTPError as e:
        return e.code == 401
    except OSError:
        return False


@pytest.fixture(scope="module")
def registry(docker_engine) -> str:
    for hp in (REGISTRY, AUTH_REGISTRY):
        if not _answers(hp):
            missing_part(f"no container registry answers at {hp}; run scripts/start-services.sh")
    return REGISTRY


@pytest.fixture()
def project(tmp_path, docker_engine):
    """A project whose slim image (its semantic tag) is a small Debian image with a marker file."""
    name = f"pushtest{uuid.uuid4().hex[:8]}"
    (tmp_path / "capsule.yaml").write_text(f"name: {name}\nimage: {{torch: '2.13.0', cuda: cpu, python: '3.11', flavor: slim}}\n")
    tag = f"{name}:2.13.0-cpu-py3.11-slim"

    def build(marker: str) -> str:
        ctx = tmp_path / "ctx"
        ctx.mkdir(exist_ok=True)
        # Two layers: the first is the same in every build, the second is the "one-line change".
        (ctx / "Dockerfile").write_text(f"FROM {ensure_base_image()}\nRUN echo base-{name} > /base\n"
                                        f"RUN echo {marker} > /marker\n")
        docker("build", "-q", "-t", tag, str(ctx), timeout=600)
        return tag

    yield tmp_path, name, build
    # Every image this test made, also those pulled by digest (listed as REPO:<none>): by id.
    rows = docker("image", "ls", "--format", "{{.ID}} {{.Repository}}", check=False).stdout.splitlines()
    ids = sorted({row.split()[0] for row in rows if name in row})
    if ids:
        docker("rmi", "-f", *ids, check=False)


def _push(proj, *extra: str) -> dict:
    r = run_capsule("image", "push", "--json", *extra, cwd=proj, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_push_records_the_digest_and_a_pull_by_digest_runs(registry, project):
    proj, name, build = project
    build("first")
    out = _push(proj, "--registry", f"{registry}/i16")
    repo = f"{registry}/i16/{name}"
    assert out["tags"] == [f"{repo}:2.13.0-cpu-py3.11-slim"]  # no moving tag unless asked
    assert out["pinned"] == f"{repo}@{out['digest']}" and out["digest"].startswith("sha256:")
    rec = json.loads((proj / ".capsule" / "pushed.json").read_text())
    assert rec["slim"]["pinned"] == out["pinned"]
    # The digest is the registry's: after removing every local copy, a pull by digest gets it back.
    docker("rmi", "-f", f"{name}:2.13.0-cpu-py3.11-slim", *out["tags"])
    assert docker("image", "inspect", out["pinned"], check=False).returncode != 0
    docker("pull", out["pinned"], timeout=600)
    assert docker("run", "--rm", out["pinned"], "cat", "/marker").stdout.strip() == "first"
    docker("rmi", "-f", out["pinned"], check=False)


def test_second_push_after_a_one_line_change_uploads_one_layer(registry, project):
    proj, name, build = project
    build("first")
    first = _push(proj, "--registry", f"{registry}/i16")
    build("second")  # one line of the Dockerfile changed: only its layer is new
    second = _push(proj, "--registry", f"{registry}/i16", "--latest")
    assert second["digest"] != first["digest"]
    assert second["layers_pushed"] == 1 and second["layers_reused"] >= 1, second
    assert second["tags"][1] == f"{registry}/i16/{name}:latest-slim"
    # latest-slim names the new digest
    docker("pull", second["tags"][1], timeout=600)
    digests = docker("image", "inspect", "--format", "{{json .RepoDigests}}", second["tags"][1]).stdout
    assert second["digest"] in digests


def test_registry_refusals_are_one_line(registry, project):
    proj, _, build = project
    build("x")
    port = free_port()
    r = run_capsule("image", "push", "--registry", f"127.0.0.1:{port}/i16", cwd=proj, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "no registry answers at 127.0.0.1:" in r.stderr, r.stderr
    r = run_capsule("image", "push", "--registry", f"{AUTH_REGISTRY}/i16", cwd=proj, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and f"docker login {AUTH_REGISTRY}" in r.stderr, r.stderr
    assert not (proj / ".capsule" / "pushed.json").exists()  # nothing recorded for a failed push


def test_push_of_an_unbuilt_image_names_the_build_command(tmp_path, registry):
    (tmp_path / "capsule.yaml").write_text("name: neverbuilt\nimage: {flavor: slim}\n")
    r = run_capsule("image", "push", "--registry", f"{registry}/i16", cwd=tmp_path)
    assert r.returncode == 1 and "capsule image build --flavor slim" in r.stderr, r.stderr
    r = run_capsule("image", "push", cwd=tmp_path)
    assert r.returncode == 1 and "pass --registry HOST/PREFIX" in r.stderr, r.stderr
