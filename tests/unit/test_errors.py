"""The exception tree drawn in errors.py's docstring is the tree of its classes, exactly."""
from __future__ import annotations

import re

import pytest

from torchcapsule import errors


def _drawn() -> dict[str, str | None]:
    """{class: parent} read from the docstring's drawing (indent 4 per level)."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in errors.__doc__.splitlines():
        m = re.match(r"^    ([│├└─ ]*)([A-Z]\w+)\s", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        del stack[depth:]
        parents[m.group(2)] = stack[-1] if stack else None
        stack.append(m.group(2))
    return parents


def _defined() -> dict[str, str | None]:
    """{class: parent} of every exception class errors.py defines."""
    out: dict[str, str | None] = {}
    for name, obj in vars(errors).items():
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            base = obj.__bases__[0]
            out[name] = base.__name__ if base.__module__ == errors.__name__ else None
    return out


def test_drawing_matches_the_classes():
    assert _drawn() == _defined()


def test_every_error_is_exported_and_a_capsule_error():
    assert sorted(errors.__all__) == sorted(_defined())
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.CapsuleError)


def test_exit_codes():
    assert errors.ConfigError("x").exit_code == errors.CompatError("x").exit_code == 2
    assert errors.PipelineInterrupted("x").exit_code == 130
    assert errors.BackendError("x").exit_code == 1


def test_compat_error_is_a_config_error():
    # the drawing once said CompatError hung off CapsuleError; callers catch it as a ConfigError
    assert issubclass(errors.CompatError, errors.ConfigError)


def test_pipeline_interrupted_is_in_the_tree():
    from torchcapsule.pipeline import runner

    assert runner.PipelineInterrupted is errors.PipelineInterrupted  # what the engine raises
    assert issubclass(errors.PipelineInterrupted, errors.PipelineError)


def test_rank_cause_reads_the_failed_ranks_last_line_through_any_prefix():
    from pathlib import Path

    # recorded: `capsule run train` of examples/digits with a full 48 KiB models volume (2 gloo ranks)
    log = (Path(__file__).parents[1] / "fixtures" / "logs" / "local-disk-full-2-ranks.log").read_text()
    assert errors.rank_cause(log, 0).startswith("no space left on device writing /tmp/df/proj/models/")
    assert errors.rank_cause(log, 1).startswith("RuntimeError: [") and "Connection closed by peer" in errors.rank_cause(log, 1)
    assert errors.rank_cause(log, 2) is None
    srun = "0: noise\n1: torchcapsule: rank 3 failed: ValueError: bad batch\n1: more\n"
    assert errors.rank_cause(srun, 3) == "ValueError: bad batch"
    assert errors.rank_cause(errors.RANK_CAUSE.format(rank=12, cause="x"), 1) is None  # rank 12 is not rank 1


def test_an_error_about_a_field_carries_the_field_not_only_in_its_text():
    from torchcapsule.compat import load_matrix
    from torchcapsule.config import FieldError

    err = errors.CompatError.at("image.cuda", "torch 2.13.0: no: colon parsing here")
    assert str(err) == "image.cuda: torch 2.13.0: no: colon parsing here"
    assert (err.where, err.problem) == ("image.cuda", "torch 2.13.0: no: colon parsing here")
    assert FieldError.of(err).loc == ("image", "cuda")
    # compat's own refusals name their field the same way (config puts them on that line)
    with pytest.raises(errors.CompatError) as e:
        load_matrix().check("2.13.0", "11.8", "3.11")  # torch 2.13.0 has no CUDA 11.8 build
    assert e.value.where == "image.cuda" and str(e.value) == f"image.cuda: {e.value.problem}"
