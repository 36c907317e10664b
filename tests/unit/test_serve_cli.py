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


def test_help_shows_each_setting_with_the_models_default():
    """The flags are built from config.Serve: every field but MODEL is a flag whose help names its
    capsule.yaml key and the model's default (no second copy of a default to drift)."""
    from torchcapsule.cli.serve import serve
    from torchcapsule.config import Serve

    r = run_capsule("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # help text is wrapped
    for name, info in Serve.model_fields.items():
        if name == "model":
            continue
        assert Serve.flag(name) in text and f"serve.{name}" in text, name
        if info.default is not None and info.default is not False:
            assert f"serve.{name}; default: {info.default})" in text, name
    assert "--timeout FLOAT RANGE" in text and "[x>0]" in text  # bounds come from the field too
    flags = {p.name for p in serve.params} - {"model", "file", "smoke_test"}
    assert flags == set(Serve.model_fields) - {"model"}


def test_capsule_yaml_settings_and_flags_reach_the_server_options(tmp_path):
    """yaml `serve:` values are used, a flag given on the command line overrides its yaml value,
    MODEL is taken from capsule.yaml (relative to it), the reload interval is decided."""
    from torchcapsule.cli.serve import server_options
    from torchcapsule.config import Serve, load_project

    (tmp_path / "capsule.yaml").write_text(
        "name: demo\nserve:\n  model: models/m\n  max_queue: 8\n  timeout_s: 3\n  threads: 2\n"
        "  forward_thread: true\n  port: 9000\n")
    project = load_project(tmp_path / "capsule.yaml")
    flags = dict.fromkeys(Serve.model_fields)
    flags.pop("model")
    opts = server_options(project, str(tmp_path / "capsule.yaml"), None, {**flags, "port": 9100, "max_queue": 16})
    s = opts.settings
    assert (s.model, s.port, s.max_queue, s.timeout_s, s.threads, s.forward_thread) == (
        str(tmp_path / "models" / "m"), 9100, 16, 3.0, 2, True)
    assert (s.max_batch_size, s.reload_interval, opts.base_dir) == (32, 0.0, str(tmp_path))
    assert opts.project_file == str(tmp_path / "capsule.yaml")
    named = server_options(project, str(tmp_path / "capsule.yaml"), "models:/digits@champion", {**flags, "workers": "3"}).settings
    assert (named.model, named.workers, named.reload_interval) == ("models:/digits@champion", 3, 30.0)
    # the smoke test starts its server with the same settings, as flags
    again = Serve.flags(s)
    assert again[:1] == [s.model] and again[again.index("--max-queue") + 1] == "16"
    assert "--forward-thread" in again and again[again.index("--timeout") + 1] == "3.0"
