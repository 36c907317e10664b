"""capsule.yaml schema: the example validates; broken files give one-line, path-named errors."""
from __future__ import annotations

import pytest

from torchcapsule.config import check_cron, load_project, parse_gpus, parse_project, parse_size
from torchcapsule.errors import ConfigError

from ..conftest import EXAMPLE, run_capsule


def test_example_validates():
    p = load_project(EXAMPLE / "capsule.yaml")
    assert p.name == "digits"
    assert set(p.stages) == {"test", "train", "evaluate", "register", "serve"}
    assert p.stages["train"].distributed == "ddp"
    assert p.stages["train"].resources.memory_bytes == 4 * 2**30
    assert p.volume_path("models") == (EXAMPLE / "models").resolve()


BROKEN = {
    # case: (yaml text, substrings the one-line error must contain)
    "wrong type": ("name: x\nstages:\n  t:\n    run: a\n    retries: many\n",
                   ["f.yaml:5", "stages.t.retries", "integer", "'many'"]),
    "unknown top key": ("name: x\nstagse: {}\n",
                        ["f.yaml:2", "stagse", "did you mean 'stages'?", "allowed: name, image"]),
    "unknown nested key": ("name: x\nstages:\n  t:\n    run: a\n    resourcs: {gpus: 1}\n",
                           ["stages.t.resourcs", "did you mean 'resources'?"]),
    "negative gpus": ("name: x\nstages:\n  t:\n    run: a\n    resources: {gpus: -1}\n",
                      ["stages.t.resources.gpus", "negative", "H100:4"]),
    "bad gpu type": ("name: x\nstages:\n  t:\n    run: a\n    resources: {gpus: 'H10:4'}\n",
                     ["stages.t.resources.gpus", "did you mean H100?", "known:"]),
    "bad gpu count": ("name: x\nstages:\n  t:\n    run: a\n    resources: {gpus: 'H100:x'}\n",
                      ["stages.t.resources.gpus", "whole number"]),
    "torch/cuda that never existed": ("name: x\nimage: {torch: '2.9.1', cuda: '11.8', python: '3.11'}\n",
                                      ["f.yaml:2", "image.cuda", "no CUDA 11.8 build", "12.6, 12.8, 13.0"]),
    "python without a wheel": ("name: x\nimage: {torch: '2.6.0', cuda: '12.6', python: '3.14'}\n",
                               ["image.python", "no wheel for Python 3.14", "3.9"]),
    "unknown torch": ("name: x\nimage: {torch: '1.13.1', cuda: cpu}\n",
                      ["image.torch", "not in the compatibility matrix", "supported:"]),
    "unreleased patch": ("name: x\nimage: {torch: '2.9.7', cuda: cpu}\n",
                         ["image.torch", "never released", "2.9.0, 2.9.1"]),
    "bad flavor": ("name: x\nimage: {flavor: fat}\n", ["image.flavor", "'jupyter-ssh' or 'slim'", "'fat'"]),
    "float version": ("name: x\nimage: {python: 3.10}\n", ["image.python", "quote"]),
    "unknown need": ("name: x\nstages:\n  a: {run: x, needs: [tset]}\n  test: {run: y}\n",
                     ["stages.a.needs", "unknown stage 'tset'", "did you mean 'test'?"]),
    "bad cron": ("name: x\nschedule: {cron: '61 * * * *'}\n", ["schedule.cron", "minute 61", "0-59"]),
    "bad memory": ("name: x\nstages:\n  t:\n    run: a\n    resources: {memory: lots}\n",
                   ["stages.t.resources.memory", "8Gi"]),
    "missing name": ("image: {}\n", ["name", "is required"]),
    "bad yaml": ("name: x\nstages: [\n", ["f.yaml:", "not valid YAML"]),
    "empty run": ("name: x\nstages:\n  t: {run: ''}\n", ["stages.t.run"]),
    "bad distributed": ("name: x\nstages:\n  t: {run: a, distributed: fsdp}\n",
                        ["stages.t.distributed", "'none' or 'ddp'"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_gives_one_line_error(case):
    text, needles = BROKEN[case]
    with pytest.raises(ConfigError) as info:
        parse_project(text, "f.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("f.yaml")
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


@pytest.mark.parametrize("text,start", [
    # checks that run on a whole model but name one field (config.FieldError carries its path)
    ("name: x\nstages:\n  a: {run: x}\n  b:\n    run: y\n    needs: [a, c]\n",
     "f.yaml:6: stages.b.needs: unknown stage 'c'; stages: a, b"),
    ("name: x\nstages:\n  t:\n    run: a\n    workdir: /etc\n", "f.yaml:5: stages.t.workdir: '/etc' is /etc, outside"),
    ("name: x\nimage:\n  torch: '2.9.1'\n  cuda: '11.8'\n", "f.yaml:4: image.cuda: torch 2.9.1 has no CUDA 11.8"),
    ("name: x\nregistry:\n  promote:\n    rule: 'accuracy >>> 1'\n",
     "f.yaml:4: registry.promote.rule: 'accuracy >>> 1' is not a valid rule"),
])
def test_model_checks_name_the_field_and_its_line(text, start):
    with pytest.raises(ConfigError) as info:
        parse_project(text, "f.yaml")
    assert str(info.value).startswith(start), str(info.value)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    f = tmp_path / "capsule.yaml"
    f.write_text("name: x\nimage: {torch: '2.9.1', cuda: '11.8'}\n")
    r = run_capsule("validate", str(f))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr
    assert "image.cuda" in r.stderr and "12.6, 12.8, 13.0" in r.stderr


def test_cli_missing_file(tmp_path):
    r = run_capsule("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text,count,gtype", [(2, 2, None), ("4", 4, None), ("H100:4", 4, "H100"),
                                               ("h200:8", 8, "H200"), (0, 0, None)])
def test_parse_gpus(text, count, gtype):
    g = parse_gpus(text)
    assert (g.count, g.type) == (count, gtype)


@pytest.mark.parametrize("text,expected", [("8Gi", 8 * 2**30), ("2g", 2 * 10**9), ("512Mi", 512 * 2**20),
                                           ("1.5Gi", int(1.5 * 2**30)), (1024, 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("expr", ["0 3 * * 1", "*/15 * * * *", "0 0 1,15 * *", "@daily", "0 9-17 * * 1-5"])
def test_cron_accepts(expr):
    assert check_cron(expr) == expr


@pytest.mark.parametrize("expr", ["0 3 * *", "0 25 * * *", "x * * * *", "0 0 0 * *"])
def test_cron_refuses(expr):
    with pytest.raises(ValueError):
        check_cron(expr)


def test_init_scaffolds_a_valid_project(tmp_path):
    dest = tmp_path / "myproj"
    r = run_capsule("init", str(dest))
    assert r.returncode == 0, r.stderr
    p = load_project(dest)
    assert p.name == "myproj" and p.registry.model_name == "myproj"
    r = run_capsule("init", str(dest))
    assert r.returncode == 2 and "--force" in r.stderr
