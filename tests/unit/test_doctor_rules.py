"""Every diagnosis rule, fed with recorded or documented facts (tests/fixtures/doctor/*.json).

diagnose() is pure, so these tests need no GPU: the facts of a GPU machine are data.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from torchcapsule.doctor.diagnose import ERROR, INFO, WARNING, diagnose, exit_code, usable_gpus
from torchcapsule.doctor.facts import Device, Facts, Smoke
from torchcapsule.doctor.probes import container_evidence, format_cudnn, parse_proc_driver_version
from torchcapsule.doctor.report import SCHEMA, to_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "doctor"


def load(name: str) -> Facts:
    return Facts.from_dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def ids(findings) -> list[str]:
    return [f.id for f in findings]


def by_id(findings, fid):
    return next(f for f in findings if f.id == fid)


def test_fixtures_say_where_they_come_from():
    for p in FIXTURES.glob("*.json"):
        src = json.loads(p.read_text())["source"]
        assert src.startswith(("recorded:", "constructed from documented values")), p.name
    # only the CPU machine's facts were recorded for real
    assert load("cpu-only-build").source.startswith("recorded:")
    assert load("h100-cu130-healthy").source.startswith("constructed")


def test_facts_round_trip_and_reject_unknown_fields():
    f = load("pascal-gtx1080-cu128")
    assert Facts.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    with pytest.raises(ValueError, match="unknown fact"):
        Facts.from_dict({"gpu_count": 3})


# -- the recorded CPU machine ---------------------------------------------------------------------
def test_cpu_only_build_is_a_warning_without_required_gpus():
    f = load("cpu-only-build")
    found = diagnose(f)
    assert ids(found) == ["cpu-only-build"]
    cpu = found[0]
    assert cpu.severity == WARNING
    assert "CPU-only build of torch" in cpu.message and "2.13.0+cpu" in cpu.message
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu" in cpu.fix
    assert exit_code(found) == 0


def test_cpu_only_build_fails_require_gpus():
    found = diagnose(load("cpu-only-build"), require_gpus=1)
    assert ids(found) == ["cpu-only-build", "gpus-required"]
    assert all(f.severity == ERROR for f in found)
    assert "--require-gpus 1: 0 usable" in found[1].message
    assert exit_code(found) == 1


def test_cpu_only_build_is_an_error_when_the_machine_has_gpus():
    f = dataclasses.replace(load("cpu-only-build"), dev_nvidia=["/dev/nvidia0", "/dev/nvidiactl"])
    found = diagnose(f)
    assert by_id(found, "cpu-only-build").severity == ERROR
    assert "has NVIDIA GPU(s) it cannot use" in found[0].message


def test_cpu_only_fix_uses_the_pinned_cuda():
    f = dataclasses.replace(load("cpu-only-build"), pinned={"torch": "2.13.0", "cuda": "12.6", "python": "3.11"},
                            project_file="capsule.yaml")
    found = diagnose(f)
    assert ids(found) == ["cpu-only-build", "cuda-build-mismatch"]
    assert found[0].severity == ERROR  # a CUDA pin means GPUs are expected
    assert "whl/cu126" in found[0].fix
    assert "pins image.cuda 12.6" in found[1].message


# -- GPU machines (constructed from documented values) --------------------------------------------
def test_healthy_h100_cu130():
    f = load("h100-cu130-healthy")
    assert diagnose(f, require_gpus=1) == []
    assert usable_gpus(f, __import__("torchcapsule.compat", fromlist=["load_matrix"]).load_matrix()) == 1
    doc = to_json(f, [], require_gpus=1)
    assert doc["schema"] == SCHEMA and doc["ok"] and doc["exit_code"] == 0 and doc["usable_gpus"] == 1
    assert doc["summary"]["tf32"] is True and doc["summary"]["driver"] == "580.65.06"


def test_healthy_h100_short_of_required_count():
    found = diagnose(load("h100-cu130-healthy"), require_gpus=8)
    assert ids(found) == ["gpus-required"]
    assert "--require-gpus 8: 1 usable CUDA device(s) (1 visible to torch)" in found[0].message


def test_pascal_on_cu128_arch_missing_first():
    found = diagnose(load("pascal-gtx1080-cu128"), require_gpus=1)
    assert ids(found) == ["arch-missing", "smoke-failed", "gpus-required", "no-bf16-tf32"]
    arch = found[0]
    assert arch.severity == ERROR
    assert "sm_61" in arch.message and "2.9.1+cu128" in arch.message and "sm_70 sm_75" in arch.message
    assert "whl/cu126" in arch.fix  # cu126 still carries sm_60, which runs on 6.1
    assert "no kernel image" in found[1].message
    assert by_id(found, "no-bf16-tf32").severity == INFO


def test_container_without_gpus():
    found = diagnose(load("container-without-gpus"), require_gpus=1)
    assert ids(found) == ["no-device-nodes", "gpus-required", "shm-small"]
    nodes = found[0]
    assert "container" in nodes.message and "--gpus" in nodes.fix and "NVIDIA Container Toolkit" in nodes.fix
    # the host driver (visible through /proc) is new enough: no driver finding
    assert "driver-too-old" not in ids(found)


def test_no_device_nodes_on_a_bare_host_says_driver():
    f = dataclasses.replace(load("container-without-gpus"), in_container=False, container_evidence=[], driver=None)
    nodes = diagnose(f)[0]
    assert nodes.id == "no-device-nodes" and "kernel driver is not loaded" in nodes.message
    assert "nvidia-smi" in nodes.fix


def test_driver_535_with_cu128_runs_under_minor_version_compatibility():
    found = diagnose(load("driver-535-cu128-minor-compat"), require_gpus=1)
    assert ids(found) == ["driver-minor-compat"]
    w = found[0]
    assert w.severity == WARNING
    for quoted in ("535.183.01", "570.26", "525.60.13", "12.8"):
        assert quoted in w.message
    assert exit_code(found) == 0


def test_driver_535_with_cu130_too_old():
    found = diagnose(load("driver-535-cu130-too-old"), require_gpus=1)
    assert ids(found) == ["driver-too-old", "gpus-required"]  # the catch-all stays silent
    e = found[0]
    for quoted in ("535.183.01", "2.14.1+cu130", "CUDA 13.0", "580.65.06", "580 under minor version"):
        assert quoted in e.message
    assert ">= 580.65.06" in e.fix and "whl/cu126" in e.fix and "minor version compatibility" in e.fix


def test_empty_cuda_visible_devices():
    found = diagnose(load("empty-cuda-visible-devices"), require_gpus=1)
    assert ids(found) == ["cuda-visible-devices-empty", "gpus-required"]
    assert "CUDA_VISIBLE_DEVICES=''" in found[0].message and "unset CUDA_VISIBLE_DEVICES" in found[0].fix


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_hidden_devices_values(value):
    f = load("empty-cuda-visible-devices")
    f.env["CUDA_VISIBLE_DEVICES"] = value
    assert diagnose(f)[0].id == "cuda-visible-devices-empty"


def test_nvidia_visible_devices_void():
    f = load("empty-cuda-visible-devices")
    f.env.update(CUDA_VISIBLE_DEVICES=None, NVIDIA_VISIBLE_DEVICES="void")
    found = diagnose(f)
    assert ids(found) == ["cuda-visible-devices-empty"]
    assert "NVIDIA_VISIBLE_DEVICES='void'" in found[0].message


def test_cause_order_when_several_hold():
    """A container without --gpus and an empty CUDA_VISIBLE_DEVICES: the missing devices come first."""
    f = load("container-without-gpus")
    f.env["CUDA_VISIBLE_DEVICES"] = ""
    assert ids(diagnose(f))[:2] == ["no-device-nodes", "cuda-visible-devices-empty"]


def test_small_shm_warns_with_the_fix():
    found = diagnose(load("small-shm"), require_gpus=1)
    assert ids(found) == ["shm-small"]
    assert "64 MiB" in found[0].message and "--shm-size" in found[0].fix and "--ipc=host" in found[0].fix
    assert exit_code(found) == 0


def test_shm_at_one_gib_is_fine():
    f = dataclasses.replace(load("small-shm"), shm_bytes=1 << 30)
    assert diagnose(f) == []


def test_unexplained_init_failure_falls_back_to_torch_error():
    f = load("empty-cuda-visible-devices")
    f.env["CUDA_VISIBLE_DEVICES"] = None
    f.cuda_error = "RuntimeError: CUDA driver initialization failed, you might not have a CUDA gpu."
    found = diagnose(f)
    assert ids(found) == ["cuda-init-failed"]
    assert "CUDA driver initialization failed" in found[0].message and "nvidia-smi" in found[0].fix


def test_torch_missing():
    f = Facts(torch_error="ModuleNotFoundError: No module named 'torch'", shm_bytes=8 << 30)
    found = diagnose(f, require_gpus=1)
    assert ids(found) == ["torch-missing", "gpus-required"]
    assert "No module named 'torch'" in found[0].message and "pip install torch==" in found[0].fix


def test_arch_missing_from_nvml_when_torch_cannot_start():
    """CUDA unavailable, but NVML names the GPU: its architecture is still checked."""
    f = load("container-without-gpus")
    f.nvml_devices = [Device(0, "Tesla V100-SXM2-32GB", "7.0", seen_by="nvml")]
    f.dev_nvidia = ["/dev/nvidia0"]
    found = diagnose(f)
    assert "arch-missing" in ids(found)
    assert "sm_70" in by_id(found, "arch-missing").message


def test_ptx_only_gpu_warns():
    f = load("h100-cu130-healthy")
    f.arch_list = ["sm_80", "compute_80"]
    found = diagnose(f)
    assert ids(found) == ["arch-ptx-only"]


def test_pinned_torch_mismatch_and_python():
    f = dataclasses.replace(load("cpu-only-build"),
                            pinned={"torch": "2.12.1", "cuda": "cpu", "python": "3.12"}, project_file="x/capsule.yaml")
    found = diagnose(f)
    assert ids(found) == ["cpu-only-build", "torch-mismatch", "python-mismatch"]
    assert "torch 2.13.0+cpu is installed; x/capsule.yaml pins image.torch 2.12.1" in found[1].message
    assert found[1].severity == ERROR and found[2].severity == WARNING


def test_pinned_match_is_silent():
    f = dataclasses.replace(load("cpu-only-build"), pinned={"torch": "2.13.0", "cuda": "cpu", "python": "3.11"})
    found = diagnose(f)
    assert ids(found) == ["cpu-only-build"]
    assert found[0].severity == INFO  # the project pins image.cuda: cpu, so this build is what it asked for
    assert by_id(diagnose(f, require_gpus=1), "cpu-only-build").severity == ERROR


def test_mig_enabled_is_reported():
    f = load("h100-cu130-healthy")
    f.nvml_devices[0].mig = "enabled"
    found = diagnose(f)
    assert ids(found) == ["mig-enabled"] and found[0].severity == INFO and "MIG-<uuid>" in found[0].fix


def test_smoke_failure_on_cpu_is_an_error():
    f = dataclasses.replace(load("cpu-only-build"), smoke=[Smoke("cpu", False, error="wrong result")])
    assert by_id(diagnose(f), "smoke-failed").severity == ERROR


def test_bench_failure_warns():
    from torchcapsule.doctor.facts import Bench

    f = dataclasses.replace(load("h100-cu130-healthy"),
                            bench=[Bench("cuda:0", "NVIDIA H100 80GB HBM3", "bfloat16", 8192, error="OutOfMemoryError")])
    assert ids(diagnose(f)) == ["bench-failed"]


# -- pure parsers of probed text ------------------------------------------------------------------
def test_parse_proc_driver_version():
    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:25 UTC 2025\n"
            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert parse_proc_driver_version(text) == "580.65.06"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build\n"
    assert parse_proc_driver_version(open_module) == "570.124.06"
    assert parse_proc_driver_version("garbage") is None


def test_container_evidence():
    assert container_evidence(dockerenv=True, containerenv=False, cgroup="", env={}) == ["/.dockerenv"]
    ev = container_evidence(dockerenv=False, containerenv=False,
                            cgroup="0::/kubepods/besteffort/pod1234/abcd\n", env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert ev[0].startswith("/proc/1/cgroup: 0::/kubepods") and "KUBERNETES_SERVICE_HOST is set" in ev
    assert container_evidence(dockerenv=False, containerenv=False, cgroup="0::/init.scope\n", env={}) == []


def test_format_cudnn():
    assert format_cudnn(91002) == "9.10.2"
    assert format_cudnn(92400) == "9.24.0"
    assert format_cudnn(8902) == "8.9.2"
    assert format_cudnn(None) is None


# -- the JSON schema ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_report_of_every_fixture_matches_the_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("torchcapsule.data").joinpath("doctor.schema.json").read_text())
    facts = load(name)
    doc = to_json(facts, diagnose(facts, require_gpus=1), require_gpus=1)
    jsonschema.validate(json.loads(json.dumps(doc)), schema)
    assert doc["ok"] == (doc["exit_code"] == 0)


def test_recorded_docker_container_with_default_shm():
    """Recorded for real: a container started without --gpus or --shm-size on the CPU machine."""
    f = load("docker-no-gpus-default-shm")
    assert f.source.startswith("recorded:") and f.in_container and f.shm_bytes == 64 * 2**20
    assert any("docker" in e for e in f.container_evidence)
    found = diagnose(f)
    assert ids(found) == ["cpu-only-build", "shm-small"]
    assert exit_code(found) == 0
    assert ids(diagnose(f, require_gpus=2)) == ["cpu-only-build", "gpus-required", "shm-small"]


def test_parse_arch_flags():
    from torchcapsule.doctor.probes import parse_arch_flags

    # the CUDA_ARCH_FLAGS string found in torch-2.14.1+cu130's libtorch_cuda.so
    flags = ("-gencode;arch=compute_75,code=sm_75;-gencode;arch=compute_80,code=sm_80;-gencode;arch=compute_86,"
             "code=sm_86;-gencode;arch=compute_90,code=sm_90;-gencode;arch=compute_100,code=sm_100;-gencode;"
             "arch=compute_120,code=sm_120")
    assert parse_arch_flags(flags) == ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert parse_arch_flags("-gencode;arch=compute_120,code=compute_120") == ["compute_120"]
    assert parse_arch_flags("sm_50 sm_60 sm_70") == ["sm_50", "sm_60", "sm_70"]
    assert parse_arch_flags("") == [] and parse_arch_flags(None) == []
