"""Issue 14 against a real MLflow store: `capsule models pull` never overwrites or litters, and
the serve cache never serves another store's (or a rewritten) copy of a version."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import missing_part, run_capsule
from ._registry_model import train_model_dir, write_project

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}
    env["PYTHONPATH"] = str(REPO / "src")
    return {**env, **extra}


def _register(root: Path, model_dir: Path, *args: str) -> dict:
    r = run_capsule("models", "register", "--model-dir", str(model_dir), "--json", *args, cwd=root, env=_env(),
                    timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")
    root = tmp_path_factory.mktemp("reg14") / "proj"
    write_project(root)
    out = _register(root, train_model_dir(root / "models" / "digits"))
    assert out["version"] == "1"
    return root


def _pull(store: Path, *args: str):
    return run_capsule("models", "pull", *args, cwd=store, env=_env(), timeout=300)


def _one_line_error(r) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# -- item 3: pull destinations ---------------------------------------------------------------------
def test_pull_refuses_a_non_empty_destination_and_the_project_root(store):
    edited = (store / "models" / "digits" / "model.py")
    before = edited.read_text() + "# my edit\n"
    edited.write_text(before)
    err = _one_line_error(_pull(store, "digits@champion", "-o", str(edited.parent)))
    assert "not empty" in err and "--force" in err
    assert edited.read_text() == before
    err = _one_line_error(_pull(store, "digits@champion", "-o", ".", "--force"))  # a project, not a model dir
    assert "capsule.yaml" in err and "new or empty directory" in err
    assert (store / "capsule.yaml").is_file() and not (store / "model.safetensors").exists()


def test_pull_never_writes_into_the_current_directory_by_accident(store):
    err = _one_line_error(_pull(store, "digits@champion", "-o", ""))
    assert "-o/--output: empty path" in err
    assert not (store / "model.safetensors").exists()


@pytest.mark.parametrize("dest,expect", [("/dev/null", "not a directory"), ("/proc/x", "cannot write there")])
def test_pull_to_impossible_places_is_one_line(store, dest, expect):
    assert expect in _one_line_error(_pull(store, "digits@champion", "-o", dest))


def test_force_replaces_a_model_directory_and_removes_stale_pickles(store, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.pt").write_bytes(b"\x80\x04stale pickle")
    (dest / "model.py").write_text("old")
    r = _pull(store, "digits@champion", "-o", str(dest), "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["checksums.sha256", "meta.json", "model.py", "model.safetensors"]


def test_failed_pull_leaves_nothing_and_names_real_paths(store, tmp_path):
    out = _register(store, train_model_dir(tmp_path / "t", steps=3), "--no-promote")
    # the registry's copy of the weights rewritten: the pull must fail verification
    model_id = out["source"].rsplit("/", 1)[1]  # models:/m-<id>
    arts = store / ".capsule" / "mlartifacts" / "models" / model_id / "artifacts"
    weights = arts / "artifacts" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    dest = tmp_path / "new" / "deeper"
    err = _one_line_error(_pull(store, f"digits/{out['version']}", "-o", str(dest)))
    assert "sha256 mismatch" in err and f"models:/digits/{out['version']}" in err and ".pull-" not in err
    assert not (tmp_path / "new").exists()  # not even the folder was made
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(tmp_path / "t")


# -- item 2: the serve cache is keyed by the registry's identity -------------------------------------
def test_serve_cache_is_keyed_by_registry_identity_and_verified_against_its_tags(tmp_path, monkeypatch):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing_part("mlflow is not installed; pip install -e '.[registry]'")
    from torchcapsule.serve.reload import RegistrySource

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    root = tmp_path / "proj"
    write_project(root)
    first = train_model_dir(tmp_path / "first", seed=1)
    _register(root, first)
    cache = tmp_path / "cache"
    src = RegistrySource("models:/digits/1", cache, root / "capsule.yaml")
    d1 = src.fetch("1").path
    assert (d1 / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()

    # weights and the cache's own checksums file rewritten together: the registry's tags catch it
    other = train_model_dir(tmp_path / "other", seed=2)
    shutil.copyfile(other / "model.safetensors", d1 / "model.safetensors")
    from torchcapsule.registry.checksums import digest_dir, write_checksums
    write_checksums(d1, digest_dir(d1))
    again = src.fetch("1").path
    assert again == d1 and (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()

    # a new store numbers a different model 1 again: a different cache entry, the new weights
    shutil.rmtree(root / ".capsule")
    second = train_model_dir(tmp_path / "second", seed=3)
    assert _register(root, second)["version"] == "1"
    # in a fresh process, as `capsule serve` would be (MLflow caches its store per URI in-process)
    code = ("import sys; from pathlib import Path; from torchcapsule.serve.reload import RegistrySource; "
            "print(RegistrySource('models:/digits/1', Path(sys.argv[1]), Path(sys.argv[2])).fetch('1').path)")
    r = subprocess.run([sys.executable, "-c", code, str(cache), str(root / "capsule.yaml")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d2 = Path(r.stdout.strip().splitlines()[-1])
    assert d2 != d1
    assert (d2 / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()

