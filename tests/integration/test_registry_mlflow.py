"""The registry against a real MLflow store (embedded SQLite + local artifacts): register,
promote by rule, list/show/pull through the real CLI, plain-MLflow loading in a clean process,
tampering, malicious pickles, one-line errors, and 8 concurrent registrations."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ..conftest import missing_part, run_capsule
from ._registry_model import train_model_dir, write_project

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_installed():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_installed):
    """A project whose model was trained for real, registered once (v1, promoted to champion)."""
    root = tmp_path_factory.mktemp("reg") / "proj"
    write_project(root)
    train_model_dir(root / "models" / "digits")
    r = run_capsule("models", "register", "--json", cwd=root, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == "1" and out["promotion"]["promoted"], out
    return root


def _env(**extra: str) -> dict[str, str]:
    # run_capsule merges os.environ back in, and the in-process tests below set MLflow's
    # URI variables (mlflow.set_tracking_uri exports them): blank them for the child.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}
    env["PYTHONPATH"] = str(REPO / "src")
    return {**env, **extra}


def _db(root: Path) -> str:
    return f"sqlite:///{root}/.capsule/mlflow.db"


def test_register_records_provenance_and_checksums(store):
    r = run_capsule("models", "show", "digits@champion", "--json", cwd=store, env=_env(), check=True)
    mv = json.loads(r.stdout)
    assert mv["aliases"] == ["champion"]
    assert mv["metrics"]["accuracy"] > 0.5 and mv["params"]["kwargs.hidden"] == "32"
    tags = mv["tags"]
    for key in ("capsule.git_commit", "capsule.image_tag", "capsule.lock_hash", "capsule.torch",
                "capsule.cuda", "capsule.fingerprint", "capsule.machine"):
        assert tags[key], key
    assert tags["capsule.image_tag"] == "digits:2.13.0-cpu-py3.11-jupyter-ssh"
    assert tags["capsule.lock_hash"] == "none"  # no capsule.lock next to capsule.yaml
    assert tags["capsule.machine_source"] == "probed at registration"
    assert tags["capsule.image"] == "not in the image"  # trained and registered on the host
    assert json.loads(tags["capsule.machine"])["torch"].startswith("2.13.0")
    import hashlib

    for f in ("model.safetensors", "model.py", "meta.json"):
        want = hashlib.sha256((store / "models" / "digits" / f).read_bytes()).hexdigest()
        assert tags[f"capsule.sha256.{f}"] == want


def test_stored_model_holds_no_pickle(store):
    files = [p for p in (store / ".capsule" / "mlartifacts").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"MLmodel", "pyfunc_model.py", "model.safetensors", "model.py", "meta.json"} <= names
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib")]
    mlmodel = next(p for p in files if p.name == "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert "python_model:" not in mlmodel


def test_plain_mlflow_loads_and_predicts_in_a_clean_process(store, tmp_path):
    """Only mlflow, torch and numpy: no torchcapsule on the path, no PYTHONPATH."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x[:50] / 16.0).astype("float32")
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent("""
        import sys, numpy as np, mlflow
        m = mlflow.pyfunc.load_model('models:/digits@champion')
        out = m.predict(np.load(sys.argv[1]))
        np.save(sys.argv[2], out)
        print(sorted(k for k in sys.modules if 'capsule' in k))
    """)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": _db(store)}
    r = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"  # nothing named *capsule* was imported
    scores = np.load(tmp_path / "y.npy")
    assert scores.shape == (50, 10) and scores.dtype == np.float32
    # same scores as the trained module itself
    ns: dict = {}
    exec((store / "models" / "digits" / "model.py").read_text(), ns)
    ref = ns["build_model"](hidden=32)
    ref.load_state_dict(load_file(str(store / "models" / "digits" / "model.safetensors")))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert (scores.argmax(1) == y[:50]).mean() > 0.5


def test_list_show_pull_cli(store, tmp_path):
    r = run_capsule("models", "list", "--json", cwd=store, env=_env(), check=True)
    rows = json.loads(r.stdout)
    assert [(m["name"], m["aliases"]) for m in rows if m["name"] == "digits"] == [("digits", {"champion": "1"})]
    # the fast path (plain sqlite3, no mlflow import) answers exactly what the MLflow client does
    slow = run_capsule("models", "list", "--json", cwd=store, env=_env(CAPSULE_REGISTRY_FAST="0"), check=True)
    assert json.loads(slow.stdout) == rows
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchcapsule.cli.main", "models", "list"],
                       cwd=store, env=_env(), capture_output=True, text=True, check=True)
    mods = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    assert "mlflow" not in mods and "sqlalchemy" not in mods and "digits" in r.stdout
    r = run_capsule("models", "list", "digits", cwd=store, env=_env(), check=True)
    assert "champion" in r.stdout and "accuracy" in r.stdout
    r = run_capsule("models", "show", "digits/1", cwd=store, env=_env(), check=True)
    assert "sha256.model.safetensors" in r.stdout
    r = run_capsule("models", "show", "digits", "--json", cwd=store, env=_env(), check=True)  # the latest
    assert json.loads(r.stdout)["version"] == max(m["latest_version"] for m in rows if m["name"] == "digits")
    out = tmp_path / "pulled"
    r = run_capsule("models", "pull", "digits@champion", "-o", str(out), cwd=store, env=_env(), check=True)
    assert "sha256 verified" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checksums.sha256", "meta.json", "model.py", "model.safetensors"]
    for f in ("model.safetensors", "model.py", "meta.json"):
        assert (out / f).read_bytes() == (store / "models" / "digits" / f).read_bytes()
    r = subprocess.run(["sha256sum", "-c", "checksums.sha256"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_rule_registers_but_does_not_promote_a_worse_version(store, tmp_path):
    worse = train_model_dir(tmp_path / "worse", steps=2, accuracy=0.51)
    # this one's train stage recorded the (GPU) machine it ran on: that, not this host, is tagged
    meta = json.loads((worse / "meta.json").read_text())
    meta["machine"] = {"torch": "2.13.0+cu128", "cuda": "12.8", "gpus": "NVIDIA H100 80GB HBM3 (sm 9.0)"}
    (worse / "meta.json").write_text(json.dumps(meta))
    outputs = tmp_path / "register.outputs.json"  # what `capsule pipeline run` hands a stage
    r = run_capsule("models", "register", "--model-dir", str(worse), cwd=store, timeout=300,
                    env=_env(CAPSULE_PIPELINE_OUTPUTS=str(outputs)))
    assert r.returncode == 0, r.stderr
    reported = json.loads(outputs.read_text())
    assert reported["model_version"].startswith("models:/digits/") and not reported["promotion"]["promoted"]
    assert "registered digits version" in r.stdout
    assert "not promoted" in r.stdout and "accuracy >= champion.accuracy: fails" in r.stdout
    r = run_capsule("models", "show", "digits@champion", "--json", cwd=store, env=_env(), check=True)
    assert json.loads(r.stdout)["version"] == "1"  # the champion stayed
    # an explicit promote overrides the rule, and can be rolled back the same way
    r = run_capsule("models", "list", "digits", "--json", cwd=store, env=_env(), check=True)
    newest = json.loads(r.stdout)[0]["version"]
    tags = json.loads(r.stdout)[0]["tags"]
    assert tags["capsule.machine_source"] == "meta.json" and tags["capsule.cuda"] == "12.8"
    assert "H100" in json.loads(tags["capsule.machine"])["gpus"]
    run_capsule("models", "promote", "digits", newest, "--alias", "champion", cwd=store, env=_env(), check=True)
    r = run_capsule("models", "show", "digits@champion", "--json", cwd=store, env=_env(), check=True)
    assert json.loads(r.stdout)["version"] == newest
    run_capsule("models", "promote", "digits", "1", "--alias", "champion", cwd=store, env=_env(), check=True)


@pytest.mark.parametrize("args, expect", [
    (("show", "nosuch@champion"), "no model 'nosuch'"),
    (("show", "digits@nosuch"), "has no alias 'nosuch'"),
    (("show", "digits/999"), "has no version 999"),
    (("pull", "digits@nosuch", "-o", "x"), "capsule models promote digits VERSION --alias nosuch"),
    (("promote", "digits", "999", "--alias", "champion"), "has no version 999"),
    (("show", "not a uri!"), "models:/NAME@ALIAS"),
])
def test_unknown_names_are_one_line_errors(store, args, expect):
    r = run_capsule("models", *args, cwd=store, env=_env())
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert expect in r.stderr and r.stderr.startswith("error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_tampered_weights_are_refused_on_pull_and_load(store, tmp_path):
    from torchcapsule.errors import IntegrityError
    from torchcapsule.registry import download, verify_model_dir

    # a pulled directory that is modified afterwards: serve's re-check refuses it
    pulled = download("models:/digits/1", tmp_path / "ok", tracking_uri=_db(store))
    verify_model_dir(pulled)
    raw = bytearray((pulled / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (pulled / "model.safetensors").write_bytes(raw)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        verify_model_dir(pulled)
    # the registry's own copy modified: pull refuses and writes nothing
    worse = train_model_dir(tmp_path / "t", steps=3)
    r = run_capsule("models", "register", "--no-promote", "--model-dir", str(worse), "--json",
                    cwd=store, env=_env(), check=True, timeout=300)
    version = json.loads(r.stdout)["version"]
    source = _artifact_dir(store, json.loads(r.stdout)["source"])
    weights = source / "artifacts" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    dest = tmp_path / "tampered"
    r = run_capsule("models", "pull", f"digits/{version}", "-o", str(dest), cwd=store, env=_env())
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and "model.safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not [p for p in dest.iterdir() if not p.name.startswith(".")] if dest.exists() else True
    assert not any(dest.rglob("*.safetensors")) if dest.exists() else True


def _artifact_dir(root: Path, source: str) -> Path:
    model_id = source.rsplit("/", 1)[1]  # models:/m-<id>
    return root / ".capsule" / "mlartifacts" / "models" / model_id / "artifacts"


class _Payload:
    """Unpickling this runs code that writes a file: what a malicious registry entry would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickles_are_refused_never_executed(store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from torchcapsule.errors import IntegrityError
    from torchcapsule.registry import download

    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_Payload(marker))
    uri = _db(store)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)

    # 1) a model another tool logged the classic way (python_model.pkl), its pickle swapped for
    #    the payload and its tags forged to look like ours (checksums included)
    class Plain(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    exp = client.get_experiment_by_name("digits").experiment_id
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="m", python_model=Plain(), pip_requirements=["mlflow"])
    art = _artifact_dir(store, info.model_uri)
    pkl = next(art.rglob("python_model.pkl"))
    pkl.write_bytes(evil)
    import hashlib

    forged = {"capsule.format": "torchcapsule/1",
              "capsule.sha256.python_model.pkl": hashlib.sha256(evil).hexdigest()}
    client.create_registered_model("foreign")
    mv = client.create_model_version("foreign", info.model_uri, tags=forged, model_id=info.model_id)
    with pytest.raises(IntegrityError, match="not a torchcapsule model"):
        download(f"models:/foreign/{mv.version}", tmp_path / "a", tracking_uri=uri)
    r = run_capsule("models", "pull", f"foreign/{mv.version}", "-o", str(tmp_path / "b"), cwd=store, env=_env())
    assert r.returncode == 1 and "refused" in r.stderr

    # 2) one of our versions whose weight file is replaced by the payload, checksum tag forged to match
    worse = train_model_dir(tmp_path / "t", steps=2)
    r = run_capsule("models", "register", "--no-promote", "--model-dir", str(worse), "--json",
                    cwd=store, env=_env(), check=True, timeout=300)
    out = json.loads(r.stdout)
    (_artifact_dir(store, out["source"]) / "artifacts" / "model.safetensors").write_bytes(evil)
    client.set_model_version_tag("digits", out["version"], "capsule.sha256.model.safetensors",
                                 hashlib.sha256(evil).hexdigest())
    with pytest.raises(IntegrityError, match="pickled content is refused"):
        download(f"models:/digits/{out['version']}", tmp_path / "c", tracking_uri=uri)
    assert not marker.exists()


def test_unreachable_tracking_server_is_a_quick_one_line_error(store, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    t = time.monotonic()
    r = run_capsule("models", "list", "--tracking-uri", f"http://127.0.0.1:{port}", cwd=tmp_path,
                    env=_env(), timeout=120)
    took = time.monotonic() - t
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot reach MLflow tracking server") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert took < 60, took  # MLflow's own retries would take minutes


def test_no_store_configured_is_a_one_line_error(tmp_path, mlflow_installed):
    r = run_capsule("models", "list", cwd=tmp_path, env=_env())
    assert r.returncode == 2 and "capsule.yaml" in r.stderr and "Traceback" not in r.stderr
    # a project whose store does not exist yet: an empty list, and no store created to say so
    write_project(tmp_path / "p")
    r = run_capsule("models", "list", cwd=tmp_path / "p", env=_env(), check=True)
    assert "no registered models" in r.stdout and not (tmp_path / "p" / ".capsule").exists()


def test_eight_concurrent_registrations_get_eight_versions(tmp_path, mlflow_installed):
    """8 processes register the same name at once on a fresh SQLite store (first-use migrations
    included): 8 distinct versions, none lost."""
    root = tmp_path / "proj"
    write_project(root, model_name="race")
    model = train_model_dir(root / "models" / "race", steps=2)
    # recorded machine facts spare each of the 8 processes a torch import (2 shared cores here)
    meta = json.loads((model / "meta.json").read_text())
    meta["machine"] = {"torch": "2.13.0+cpu", "cuda": "none"}
    (model / "meta.json").write_text(json.dumps(meta))
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, time
        from torchcapsule.config import load_project
        from torchcapsule.registry import register
        p = load_project({str(root / 'capsule.yaml')!r})
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print(register(p, {str(model)!r}).version)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(3)  # let all 8 import torch/mlflow first, so they really start together
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in results]
    versions = sorted(int(out.strip()) for out, _ in results)
    assert versions == list(range(1, 9))
    r = run_capsule("models", "list", "race", "--json", cwd=root, env=_env(), check=True)
    listed = json.loads(r.stdout)
    assert sorted(int(v["version"]) for v in listed) == list(range(1, 9))
    assert len({v["run_id"] for v in listed}) == 8


@pytest.fixture()
def mlflow_server(tmp_path, mlflow_installed):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts) for the remote path."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        missing_part("the `mlflow` command is missing next to the interpreter; pip install mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)  # the server's own process group: uvicorn and its worker
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log.close()


def test_remote_tracking_server_register_list_pull(mlflow_server, tmp_path):
    root = tmp_path / "proj"
    write_project(root, tracking_uri=mlflow_server)
    train_model_dir(root / "models" / "digits", steps=20)
    r = run_capsule("models", "register", "--json", cwd=root, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == "1" and out["promotion"]["promoted"]
    assert not (root / ".capsule").exists()  # nothing went to the embedded store
    r = run_capsule("models", "list", "--json", cwd=root, env=_env(), check=True)
    assert json.loads(r.stdout)[0]["aliases"] == {"champion": "1"}
    # the same server through $MLFLOW_TRACKING_URI and no capsule.yaml at all
    dest = tmp_path / "pulled"
    r = run_capsule("models", "pull", "digits@champion", "-o", str(dest), cwd=tmp_path,
                    env=_env(MLFLOW_TRACKING_URI=mlflow_server), check=True)
    assert (dest / "model.safetensors").read_bytes() == (root / "models" / "digits" / "model.safetensors").read_bytes()
    assert (tmp_path / "server-artifacts").is_dir()
