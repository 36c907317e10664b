"""`capsule serve` argument handling: fast help, one-line errors for missing/bad inputs."""
from __future__ import annotations

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
