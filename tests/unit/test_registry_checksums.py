"""Pure parts of the registry: checksums and pickle refusal, model URIs, store location, lock."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchcapsule.config import parse_project
from torchcapsule.errors import IntegrityError, RegistryError
from torchcapsule.registry import checksums as cks
from torchcapsule.registry.store import sqlite_path, tracking_uri
from torchcapsule.registry.types import parse_model_uri


def _safetensors(path: Path, header_pad: int = 0) -> None:
    """A valid safetensors file written by hand (one float32 tensor of 2 values)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}) + " " * header_pad
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + struct.pack("<2f", 1.0, 2.0))


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir(parents=True)
    _safetensors(d / "model.safetensors")
    (d / "model.py").write_text("def build_model():\n    pass\n")
    (d / "meta.json").write_text("{}")
    return d


def test_verify_accepts_intact_and_refuses_tampered(tmp_path):
    d = _model_dir(tmp_path)
    digests = cks.digest_dir(d)
    assert set(digests) == {"model.safetensors", "model.py", "meta.json"}
    cks.write_checksums(d, digests)
    cks.verify_model_dir(d)  # intact
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(raw)
    with pytest.raises(IntegrityError, match="sha256 mismatch.*model.safetensors|model.safetensors.*sha256 mismatch"):
        cks.verify_model_dir(d)


def test_verify_refuses_missing_checksums_and_missing_files(tmp_path):
    d = _model_dir(tmp_path)
    with pytest.raises(IntegrityError, match="no recorded checksums"):
        cks.verify_model_dir(d)
    digests = cks.digest_dir(d)
    (d / "model.py").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        cks.verify(d, digests)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/never",))


def test_pickled_weights_are_refused_even_with_a_matching_checksum(tmp_path):
    d = _model_dir(tmp_path)
    (d / "model.safetensors").write_bytes(pickle.dumps(_Boom(), protocol=4))
    with pytest.raises(IntegrityError, match="pickled"):
        cks.verify(d, cks.digest_dir(d))
    (d / "model.safetensors").write_bytes(pickle.dumps(_Boom(), protocol=0))  # text protocol, no magic
    with pytest.raises(IntegrityError, match="is not safetensors"):
        cks.verify(d, cks.digest_dir(d))
    d2 = _model_dir(tmp_path / "x")
    (d2 / "extra.pt").write_bytes(b"anything")
    with pytest.raises(IntegrityError, match="extra.pt.*pickled"):
        cks.verify(d2, cks.digest_dir(d2))


def test_safetensors_whose_length_starts_like_a_pickle_is_accepted(tmp_path):
    p = tmp_path / "w.safetensors"
    _safetensors(p)
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    pad = (0x80 - n) % 256  # make the header length's first byte 0x80 (pickle's PROTO opcode)
    _safetensors(p, header_pad=pad)
    assert p.read_bytes()[0] == 0x80
    assert not cks.looks_pickled(p)
    cks.check_safetensors_header(p)


@pytest.mark.parametrize("uri, name, alias, version", [
    ("models:/digits@champion", "digits", "champion", None),
    ("models:/digits/3", "digits", None, "3"),
    ("digits@champion", "digits", "champion", None),
    ("digits/latest", "digits", None, "latest"),
])
def test_parse_model_uri(uri, name, alias, version):
    ref = parse_model_uri(uri)
    assert (ref.name, ref.alias, ref.version) == (name, alias, version)


@pytest.mark.parametrize("bad", ["models:/", "models:/digits", "models:/digits/x", "models:/a/b/c", "a@b@c"])
def test_bad_model_uri_is_one_line(bad):
    with pytest.raises(RegistryError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse_model_uri(bad)


def test_tracking_uri_order(tmp_path, monkeypatch):
    (tmp_path / "capsule.yaml").write_text("name: p\n")
    p = parse_project("name: p\n", tmp_path / "capsule.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(p) == f"sqlite:///{tmp_path.resolve()}/.capsule/mlflow.db"
    assert sqlite_path(tracking_uri(p)) == tmp_path.resolve() / ".capsule" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(p) == "http://env:5000"
    p2 = parse_project("name: p\nregistry: {tracking_uri: 'http://yaml:5000'}\n", tmp_path / "capsule.yaml")
    assert tracking_uri(p2) == "http://yaml:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_URI"):
        tracking_uri(None)


def test_writer_lock_excludes_another_process(tmp_path):
    """While one process holds the store lock, another waits for it (fcntl, across processes).

    Events, not timings (a loaded machine made a 0.9 s threshold flaky): the child says when its
    first attempt was refused, and after getting the lock reports whether the holder had let go.
    """
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    released = tmp_path / "released"
    code = textwrap.dedent(f"""
        import fcntl, os
        real, said = fcntl.flock, []
        def flock(fh, op):
            try:
                return real(fh, op)
            except BlockingIOError:
                if not said:
                    said.append(print("blocked", flush=True))
                raise
        fcntl.flock = flock
        from torchcapsule.registry.store import writer_lock
        with writer_lock({uri!r}):
            print("acquired", os.path.exists({str(released)!r}), flush=True)
    """)
    from torchcapsule.registry.store import writer_lock

    with writer_lock(uri):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert child.stdout.readline().strip() == "blocked"  # refused while we hold the lock
        released.write_text("")
    out, _ = child.communicate(timeout=120)
    assert out.split() == ["acquired", "True"]  # it got the lock only after we let go


def test_registry_package_import_is_light():
    r = subprocess.run([sys.executable, "-c", "import sys, torchcapsule.registry as r; "
                        "r.ModelVersion; print('mlflow' in sys.modules, 'torch' in sys.modules)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stdout.split() == ["False", "False"], r.stderr
