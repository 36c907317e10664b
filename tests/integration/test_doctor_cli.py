"""The real `capsule doctor` on the machine the tests run on (a subprocess, real torch, real probes).

On a CPU machine (this project's CI) it must report the CPU-only build; on a GPU machine with a
CUDA build the expectations flip, and the tests say which machine they found.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..conftest import EXAMPLE, run_capsule


@pytest.fixture(scope="module")
def torch_cuda():
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda)"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"torch is not importable in the test environment: {r.stderr[-500:]}")
    return None if r.stdout.strip() == "None" else r.stdout.strip()


@pytest.fixture(scope="module")
def doctor_json(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("nowhere")  # no capsule.yaml above it
    r = run_capsule("doctor", "--json", cwd=cwd, timeout=300)
    return r


def test_json_is_one_valid_object(doctor_json):
    doc = json.loads(doctor_json.stdout)  # the whole of stdout is one JSON object
    assert doc["schema"] == "torchcapsule.doctor/v1"
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    jsonschema.validate(doc, json.loads(resources.files("torchcapsule.data").joinpath("doctor.schema.json").read_text()))
    assert doc["exit_code"] == doctor_json.returncode
    for key in ("torch_version", "torch_cuda", "cuda_available", "device_count", "devices", "driver",
                "cudnn", "nccl", "shm_bytes", "in_container", "env", "smoke"):
        assert key in doc["facts"], key
    assert doc["facts"]["source"] == "probed"
    assert doc["facts"]["smoke"] and all(s["ok"] for s in doc["facts"]["smoke"])


def test_cpu_machine_reports_cpu_only_build(doctor_json, torch_cuda):
    if torch_cuda is not None:
        pytest.skip(f"torch here is a CUDA {torch_cuda} build; this test is about the CPU machine")
    doc = json.loads(doctor_json.stdout)
    assert doc["summary"]["cuda_available"] is False and doc["facts"]["cuda_available"] is False
    first = doc["findings"][0]
    assert first["id"] == "cpu-only-build"
    assert "CPU-only build of torch" in first["message"]
    assert first["fix"].startswith("pip install torch==")
    assert doctor_json.returncode == 0, doctor_json.stderr
    assert doc["facts"]["smoke"][0]["device"] == "cpu"


def test_require_gpus_fails_without_gpus(tmp_path, torch_cuda):
    r = run_capsule("doctor", "--json", "--require-gpus", "1", cwd=tmp_path, timeout=300)
    doc = json.loads(r.stdout)
    if doc["usable_gpus"] >= 1:
        pytest.skip("this machine has a usable GPU")
    assert r.returncode == 1
    found = [f["id"] for f in doc["findings"]]
    assert "gpus-required" in found
    if torch_cuda is None:
        assert found[0] == "cpu-only-build" and doc["findings"][0]["severity"] == "error"


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_bad_require_gpus_is_a_usage_error(tmp_path, value):
    r = run_capsule("doctor", "--require-gpus", value, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --require-gpus:"), r.stderr
    assert r.stdout == ""


def test_text_report_and_pinned_project(torch_cuda):
    """With the example's capsule.yaml (-f) the report compares the pinned torch."""
    r = run_capsule("doctor", "-f", str(EXAMPLE / "capsule.yaml"), timeout=300)
    out = r.stdout
    assert "torch.version.cuda" in out and "/dev/shm" in out
    assert ("smoke cpu" in out) or ("smoke cuda:0" in out)
    assert "2.13.0 pinned in" in out and str(EXAMPLE / "capsule.yaml") in out
    j = run_capsule("doctor", "--json", "-f", str(EXAMPLE / "capsule.yaml"), timeout=300)
    summary = json.loads(j.stdout)["summary"]
    assert summary["pinned_torch"] == "2.13.0"
    assert summary["torch_matches_pin"] == (summary["torch"].split("+")[0] == "2.13.0")
    if torch_cuda is None:  # the example pins a CPU build: on the CPU machine all is well
        assert "matches 2.13.0 pinned" in out and r.returncode == 0, out + r.stderr


def test_missing_project_file_is_a_usage_error(tmp_path):
    r = run_capsule("doctor", "-f", str(tmp_path / "nope.yaml"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "no such file" in r.stderr


def test_bench_on_this_machine(tmp_path):
    r = run_capsule("doctor", "--json", "--bench", cwd=tmp_path, timeout=600)
    doc = json.loads(r.stdout)
    bench = doc["facts"]["bench"]
    assert bench and bench[0]["error"] is None
    assert bench[0]["gemm_tflops"] > 0 and bench[0]["mem_gbps"] > 0


def test_doctor_help_imports_no_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchcapsule.cli.main", "doctor", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--require-gpus" in r.stdout
    mods = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    assert "torch" not in mods and "pynvml" not in mods


BASE_IMAGE = "local/debian:bookworm"  # Debian 12 with python3 3.11 (docs: ENVIRONMENT, image capability)


def _docker_doctor(docker_engine, *docker_args: str) -> subprocess.CompletedProcess:
    """`capsule doctor --json` in a real container: Debian's python3 with this venv's packages mounted."""
    import sysconfig
    from pathlib import Path

    r = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, text=True)
    if r.returncode != 0:
        from ..conftest import missing_part

        missing_part(f"Docker image {BASE_IMAGE} is missing; make it with mmdebstrap + docker import "
                     f"(see scripts/install-system.sh / the image capability)")
    src = Path(__file__).resolve().parents[2] / "src"
    deps = sysconfig.get_paths()["purelib"]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "host", *docker_args,
         "-v", f"{deps}:/deps:ro", "-v", f"{src}:/capsule/src:ro", "-e", "PYTHONPATH=/capsule/src:/deps",
         "-w", "/tmp", BASE_IMAGE, "python3", "-m", "torchcapsule.cli.main", "doctor", "--json"],
        capture_output=True, text=True, timeout=300)


def test_in_docker_default_shm_is_diagnosed(docker_engine):
    r = _docker_doctor(docker_engine)
    doc = json.loads(r.stdout)
    facts = doc["facts"]
    assert facts["in_container"] and "/.dockerenv" in facts["container_evidence"]
    assert facts["dev_nvidia"] == [] and facts["shm_bytes"] == 64 * 2**20
    shm = next(f for f in doc["findings"] if f["id"] == "shm-small")
    assert "64 MiB" in shm["message"] and "--shm-size" in shm["fix"]
    assert r.returncode == 0  # warnings only


def test_in_docker_the_fix_clears_the_warning(docker_engine):
    r = _docker_doctor(docker_engine, "--shm-size=1g")
    doc = json.loads(r.stdout)
    assert doc["facts"]["shm_bytes"] == 2**30
    assert "shm-small" not in [f["id"] for f in doc["findings"]]
