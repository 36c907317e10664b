"""`capsule serve` argument handling: fast help, one-line errors for missing/bad inputs."""
from __future__ import annotations

import pytest
import torch

from torchcapsule.errors import ServeError
from torchcapsule.serve.reload import resolve_device

from ..conftest import run_capsule
from .test_cli import HEAVY, _imported


def test_serve_help_imports_nothing_heavy():
    mods = _imported("serve", "--help")
    assert not (mods & set(HEAVY)), mods & set(HEAVY)


def test_no_model_and_no_project_is_a_config_error(tmp_path):
    r = run_capsule("serve", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no MODEL given" in r.stderr or "capsule.yaml" in r.stderr


def test_project_without_serve_model(tmp_path):
    (tmp_path / "capsule.yaml").write_text("name: demo\n")
    r = run_capsule("serve", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: no MODEL given and capsule.yaml has no serve.model "
        "(pass models:/NAME@ALIAS, models:/NAME/VERSION or a directory)")


def test_bad_workers_value(tmp_path):
    r = run_capsule("serve", str(tmp_path), "--workers", "many", cwd=tmp_path)
    assert r.returncode == 2 and "--workers 'many'" in r.stderr and "Traceback" not in r.stderr


def test_invalid_capsule_yaml_is_reported_not_ignored(tmp_path):
    (tmp_path / "capsule.yaml").write_text("name: demo\nserve:\n  port: 99999\n")
    r = run_capsule("serve", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "serve.port" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --workers gpu is valid here")
def test_workers_gpu_needs_a_gpu(tmp_path):
    r = run_capsule("serve", str(tmp_path), "--workers", "gpu", cwd=tmp_path)
    assert r.returncode == 2 and "--workers gpu: no CUDA device is visible" in r.stderr


def test_device_specs():
    assert str(resolve_device("cpu")) == "cpu"
    with pytest.raises(ServeError, match="is not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ServeError, match="no CUDA device is visible"):
            resolve_device("cuda:0")
