"""Model directories, checksums, the default handler's request type, handler loading,
version sources and the watcher's accept/reject decisions."""
from __future__ import annotations

import json
import os

import msgspec
import pytest

from torchcapsule.errors import ConfigError, IntegrityError, ServeError
from torchcapsule.serve.handler import DefaultHandler, Handler, InputError, load_handler_class
from torchcapsule.registry.modeldir import read_model_dir
from torchcapsule.serve.loader import build_module, verify_checksums
from torchcapsule.serve.reload import LocalSource, Watcher, load_version, make_source
from torchcapsule.serve.testing import write_mlp_dir


@pytest.fixture
def model_dir(tmp_path):
    return write_mlp_dir(tmp_path / "m", (64, 8, 10), version="7")


def test_checksums_refuse_a_tampered_file(model_dir):
    assert verify_checksums(read_model_dir(model_dir)) == 1
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-1] ^= 1  # a weight, not the header (a broken header is refused by read_model_dir)
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        build_module(read_model_dir(model_dir), "cpu")


def test_weights_that_do_not_fit_the_code_name_the_file(tmp_path, model_dir):
    meta = json.loads((model_dir / "meta.json").read_text())
    meta["kwargs"]["sizes"] = [64, 9, 10]
    (model_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ServeError, match=r"model.safetensors: does not fit build_model\(\)"):
        build_module(read_model_dir(model_dir), "cpu")


def test_two_versions_load_side_by_side_with_their_own_code(tmp_path):
    a = write_mlp_dir(tmp_path / "a", (64, 8, 10), seed=1)
    b = write_mlp_dir(tmp_path / "b", (64, 8, 3), labels=["x", "y", "z"], seed=2)
    ma, mb = build_module(read_model_dir(a), "cpu"), build_module(read_model_dir(b), "cpu")
    assert ma[-1].out_features == 10 and mb[-1].out_features == 3


def test_default_handler_request_type_checks_shape_and_type(model_dir):
    h = DefaultHandler(read_model_dir(model_dir))
    dec = msgspec.json.Decoder(h.Request)
    assert len(dec.decode(json.dumps({"inputs": [1] * 64})).inputs) == 64  # ints are fine for floats
    with pytest.raises(msgspec.ValidationError, match=r"length <= 64 - at `\$.inputs`"):
        dec.decode(json.dumps({"inputs": [1.0] * 65}))
    with pytest.raises(msgspec.ValidationError, match=r"got `null` - at `\$.inputs\[2\]`"):
        dec.decode(json.dumps({"inputs": [1.0, 2.0, None] + [0.0] * 61}))


def test_default_handler_nested_shape(tmp_path):
    d = write_mlp_dir(tmp_path / "img", (64, 8, 10), extra_meta={"input_shape": [8, 8]})
    h = DefaultHandler(read_model_dir(d))
    dec = msgspec.json.Decoder(h.Request)
    dec.decode(json.dumps({"inputs": [[0.0] * 8] * 8}))
    with pytest.raises(msgspec.ValidationError, match=r"at `\$.inputs\[7\]`"):
        dec.decode(json.dumps({"inputs": [[0.0] * 8] * 7 + [[0.0] * 7]}))
    schema = msgspec.json.schema(h.Request)
    assert schema["$defs"]["PredictRequest"]["properties"]["inputs"]["items"]["maxItems"] == 8


def test_default_handler_needs_input_shape(tmp_path):
    d = write_mlp_dir(tmp_path / "m", (64, 8, 10), extra_meta={"input_shape": None})
    with pytest.raises(ConfigError, match="input_shape is missing"):
        DefaultHandler(read_model_dir(d))


def test_runner_answers_each_request_and_isolates_failures(model_dir):
    class Picky(DefaultHandler):
        def preprocess_batch(self, requests):
            if any(r.inputs[0] < 0 for r in requests):
                raise InputError("inputs[0] must not be negative", "$.inputs[0]")
            return super().preprocess_batch(requests)

    r = load_version(LocalSource(model_dir), LocalSource(model_dir).current(), Picky, "cpu", warmup_batch=4)
    good = r.decoder.decode(json.dumps({"inputs": [0.5] * 64}))
    bad = r.decoder.decode(json.dumps({"inputs": [-1.0] * 64}))
    out = r.process([good, bad, good])
    assert isinstance(out[1], InputError) and out[1].field == "$.inputs[0]"
    answers = [json.loads(out[0]), json.loads(out[2])]
    assert answers[0] == answers[1] and len(answers[0]["scores"]) == 10


def test_load_handler_class(tmp_path):
    assert load_handler_class(None) is DefaultHandler
    (tmp_path / "h.py").write_text(
        "import msgspec\nfrom torchcapsule.serve import Handler\n"
        "class Req(msgspec.Struct):\n    x: int\n"
        "class H(Handler):\n    Request = Req\n    Response = Req\n"
        "class NotOne:\n    pass\n")
    cls = load_handler_class("h.py:H", tmp_path)
    assert issubclass(cls, Handler) and cls.__name__ == "H"
    with pytest.raises(ConfigError, match="not a subclass"):
        load_handler_class("h.py:NotOne", tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_handler_class("nope.py:H", tmp_path)
    with pytest.raises(ConfigError, match="expected FILE.py:Class"):
        load_handler_class("h.py", tmp_path)


def test_local_source_follows_symlinks_pointer_files_and_rewrites(tmp_path):
    a = write_mlp_dir(tmp_path / "versions" / "a", (64, 8, 10), version="a")
    b = write_mlp_dir(tmp_path / "versions" / "b", (64, 8, 10), version="b")
    link = tmp_path / "current"
    link.symlink_to(a)
    src = LocalSource(link)
    k1 = src.current()
    assert src.fetch(k1).version == "a"
    link.unlink()
    link.symlink_to(b)
    assert src.fetch(src.current()).version == "b"
    ptr = LocalSource(tmp_path / "versions")
    (tmp_path / "versions" / "CURRENT").write_text("a\n")
    assert ptr.fetch(ptr.current()).version == "a"
    (tmp_path / "versions" / "CURRENT").write_text("b\n")
    kb = ptr.current()
    assert ptr.fetch(kb).version == "b"
    os.utime(b / "meta.json", ns=(1, 1))  # rewritten in place: a new key
    assert ptr.current() != kb


def test_make_source(tmp_path):
    assert make_source("models:/digits@champion").name == "digits"
    with pytest.raises(ServeError, match="does not exist"):
        make_source("nowhere", base_dir=tmp_path)


def test_watcher_rejects_a_bad_version_once_and_keeps_serving(tmp_path):
    class Src(LocalSource):
        key = "v1"

        def current(self):
            return self.key

    published, rejected, loads = [], [], []

    def load(key):
        loads.append(key)
        if key == "bad":
            raise RuntimeError("warm-up failed")
        return key

    src = Src(tmp_path)
    w = Watcher(src, load, published.append, lambda k, m: rejected.append((k, m)), 1, serving_key="v1")
    assert w.check_once() is None
    src.key = "bad"
    assert w.check_once() == "rejected" and w.check_once() is None  # not retried every poll
    assert rejected == [("bad", "RuntimeError: warm-up failed")] and published == []
    src.key = "v2"
    assert w.check_once() == "loaded" and published == ["v2"]
    assert loads == ["bad", "v2"]
