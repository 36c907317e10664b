"""The one reader of a trained model directory (registry/modeldir.py) and its checks, and that
register and serve both go through it (pull: tests/integration/test_registry_hardening.py)."""
from __future__ import annotations

import json
import pickle

import pytest

from torchcapsule.config import parse_project
from torchcapsule.errors import IntegrityError, RegistryError
from torchcapsule.registry.modeldir import read_model_dir
from torchcapsule.serve.testing import write_mlp_dir


@pytest.fixture
def model_dir(tmp_path):
    return write_mlp_dir(tmp_path / "m", (64, 8, 10), version="7")


def _meta(d, **changes):
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))


def test_a_train_stage_directory_reads_with_its_metadata(model_dir):
    md = read_model_dir(model_dir, source="models:/digits/7")
    assert (md.name, md.version, md.input_shape, md.input_dtype, md.labels[:2], md.source) == (
        "digits", "7", (64,), "float32", ["0", "1"], "models:/digits/7")
    assert read_model_dir(model_dir, version="3").version == "3"  # the registry's number wins


def test_missing_directory_and_missing_files(tmp_path, model_dir):
    with pytest.raises(RegistryError, match=r"nope: no model directory there; run the train stage"):
        read_model_dir(tmp_path / "nope")
    (model_dir / "model.py").unlink()
    (model_dir / "meta.json").unlink()
    with pytest.raises(RegistryError, match=r"missing model.py, meta.json; a model directory holds"):
        read_model_dir(model_dir)


@pytest.mark.parametrize("text, words", [
    ("{nope", "meta.json: not valid JSON"),
    ("[1, 2]", "meta.json: expected a JSON object"),
    ('{"kwargs": [1]}', "'kwargs' must be a JSON dict"),
    ('{"metrics": 0.9}', "'metrics' must be a JSON dict"),
    ('{"labels": "0123"}', "'labels' must be a JSON list"),
    ('{"input_shape": 64}', "'input_shape' must be a JSON list"),
    ('{"input_shape": []}', r"input_shape: \[\] is not a list of positive integers"),
    ('{"input_shape": [0]}', r"input_shape: \[0\] is not a list of positive integers"),
    ('{"input_shape": [8, 2.5]}', r"input_shape: \[8, 2.5\] is not a list of positive integers"),
    ('{"input_shape": [true]}', r"input_shape: \[True\] is not a list of positive integers"),
    ('{"input_dtype": "complex64"}', "input_dtype: 'complex64' is not supported .allowed: float32"),
])
def test_bad_meta_is_one_line_naming_meta_json(model_dir, text, words):
    (model_dir / "meta.json").write_text(text)
    with pytest.raises(RegistryError, match=words) as e:
        read_model_dir(model_dir)
    assert "\n" not in str(e.value) and str(model_dir / "meta.json") in str(e.value)


def test_weights_that_are_not_safetensors_are_refused_by_name(model_dir):
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8] = ord("#")  # the JSON header's opening brace: corrupt
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors is not safetensors .maybe a pickle, or corrupt"):
        read_model_dir(model_dir)
    weights.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(IntegrityError, match="is not safetensors .it starts like a pickle"):
        read_model_dir(model_dir)


def test_register_and_serve_refuse_with_the_same_check(tmp_path, model_dir):
    """register() reads the directory before it opens any store; serve's source reads it the same way."""
    from torchcapsule.registry.mlflow import register
    from torchcapsule.serve.reload import LocalSource

    _meta(model_dir, input_shape=[0])
    project = parse_project("name: p\n", tmp_path / "capsule.yaml")
    with pytest.raises(RegistryError, match=r"input_shape: \[0\]") as by_register:
        register(project, model_dir)
    assert not (tmp_path / ".capsule").exists()  # no store was created
    source = LocalSource(model_dir)
    with pytest.raises(RegistryError) as by_serve:
        source.fetch(source.current())
    assert str(by_serve.value) == str(by_register.value)
