"""Provenance facts: git commit, lock hash, fingerprint; and the CLI group stays light."""
from __future__ import annotations

import hashlib
import subprocess
import sys

from torchcapsule.config import parse_project
from torchcapsule.registry import facts


def test_git_commit_unknown_outside_a_repo_and_dirty_marked(tmp_path):
    assert facts.git_commit(tmp_path) == "unknown"
    run = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert facts.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert facts.git_commit(tmp_path) == head + "-dirty"


def test_lock_hash(tmp_path):
    p = parse_project("name: p\n", tmp_path / "capsule.yaml")
    assert facts.lock_hash(p) == "none"
    (tmp_path / "capsule.lock").write_text("torch==2.13.0 --hash=sha256:abc\n")
    assert facts.lock_hash(p) == hashlib.sha256(b"torch==2.13.0 --hash=sha256:abc\n").hexdigest()


def test_fingerprint_is_stable_and_sensitive():
    a = {"torch": "2.13.0", "cuda": "12.8", "gpus": "H100"}
    assert facts.fingerprint(a) == facts.fingerprint(dict(reversed(list(a.items()))))
    assert facts.fingerprint(a) != facts.fingerprint({**a, "cuda": "13.0"})


def test_models_help_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchcapsule.cli.main", "models", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "register" in r.stdout and "pull" in r.stdout
    mods = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    assert not mods & {"mlflow", "torch", "numpy", "sqlalchemy"}


def test_running_image_is_the_launchers_digest_else_not_in_the_image(monkeypatch):
    from torchcapsule.registry import facts

    ref = "127.0.0.1:5070/acme/digits@sha256:" + "ab" * 32
    monkeypatch.setenv("CAPSULE_IMAGE", ref)
    assert facts.running_image() == ref
    monkeypatch.delenv("CAPSULE_IMAGE")
    assert facts.running_image() == "not in the image"
