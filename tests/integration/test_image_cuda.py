"""The CUDA image, for real: the digits example with `cuda: "13.0"` locked from PyPI alone (pip's
configuration switched off: no find-links, no constraints, no extra index) and built with the
real `capsule image build` (slim and jupyter-ssh), then checked inside the image without a GPU.

Cost: the first run downloads torch's CUDA wheels (~2.6 GB) into a stable wheelhouse
(CAPSULE_WHEELHOUSE, default ~/.cache/torchcapsule/wheelhouse) that later runs and both builds
reuse; each image is built once per session and shared by every test here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from tests.conftest import EXAMPLE, run_capsule
from tests.integration.image_fixtures import BASE_IMAGE, docker, ensure_base_image
from torchcapsule._util import sha256_file
from torchcapsule.image import lock as lockmod

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]  # the first test builds

CUDA, CUDA_TAG = "13.0", "cu130"
WHEELHOUSE = Path(os.environ.get("CAPSULE_WHEELHOUSE") or Path.home() / ".cache" / "torchcapsule" / "wheelhouse")
# PyPI alone: no pip config file, no find-links or constraint file from the environment, and
# no PyTorch index (a PyPI proxy given as PIP_INDEX_URL is kept: it is "PyPI" for this machine).
PYPI_ONLY = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "",
             "PIP_EXTRA_INDEX_URL": "", "CAPSULE_TORCH_INDEX": "", "CAPSULE_WHEELHOUSE": str(WHEELHOUSE)}
TIMINGS: dict[str, float] = {}


def _copy_digits(dest: Path, cuda: str) -> Path:
    shutil.copytree(EXAMPLE, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".capsule", "capsule.lock", "capsule.dev.lock", "data", "models", "logs", "mlruns", "__pycache__"))
    yaml = dest / "capsule.yaml"
    text, n = re.subn(r"(?m)^(  cuda:) \S+", rf'\1 "{cuda}"', yaml.read_text())
    assert n == 1
    yaml.write_text(text)
    return dest




def in_image(image: str, script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return docker("run", "--rm", "--network", "none", *args, image, "bash", "-c", script, check=check, timeout=600)


@pytest.fixture(scope="session")
def cuda_project(docker_engine, tmp_path_factory) -> Path:
    """A copy of examples/digits pinned to CUDA 13.0, locked from PyPI alone."""
    ensure_base_image()
    root = _copy_digits(tmp_path_factory.mktemp("digits-cu130"), CUDA)
    t0 = time.monotonic()
    r = run_capsule("image", "lock", "--base", BASE_IMAGE, cwd=root, env=PYPI_ONLY, timeout=2400)
    TIMINGS["lock"] = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def _build(root: Path, flavor: str) -> str:
    t0 = time.monotonic()
    r = run_capsule("image", "build", "--flavor", flavor, "--base", BASE_IMAGE, "--json", cwd=root,
                    env=PYPI_ONLY, timeout=3600)
    TIMINGS[f"build {flavor}"] = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"\nCUDA image timings so far (s): {json.dumps({k: round(v) for k, v in TIMINGS.items()})}",
          file=sys.stderr)
    return json.loads(r.stdout)["tag"]


@pytest.fixture(scope="session")
def cuda_slim_image(cuda_project) -> str:
    return _build(cuda_project, "slim")


@pytest.fixture(scope="session")
def cuda_dev_image(cuda_project) -> str:
    return _build(cuda_project, "jupyter-ssh")


@pytest.fixture(scope="session")
def locked(cuda_project) -> dict[str, str]:
    """name -> version of the runtime lock."""
    _, entries = lockmod.parse_lock((cuda_project / lockmod.LOCK).read_text())
    return {e.name: e.version for e in entries}


# -- the lock ----------------------------------------------------------------------------------
def test_lock_from_pypi_pins_pypis_torch_and_its_nvidia_wheels(locked):
    assert locked["torch"] == "2.13.0"  # PyPI's CUDA 13.0 build: no local version label
    assert locked["nvidia-cudnn-cu13"] == "9.20.0.48" and locked["nvidia-nccl-cu13"] == "2.29.7"
    assert Version(locked["cuda-toolkit"]) == Version("13.0.3") and "triton" in locked  # pip locks 13.0.3.0
    assert not [n for n in locked if n.endswith("-cu12")]  # no second CUDA major


# -- inside the built images, without a GPU ----------------------------------------------------
PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
         "'cudnn': torch.backends.cudnn.version(), 'nccl': list(torch.cuda.nccl.version()), "
         "'available': torch.cuda.is_available()}))")


@pytest.mark.parametrize("flavor", ["slim", "jupyter-ssh"])
def test_torch_is_the_locked_cuda_build_with_the_locked_cudnn_and_nccl(request, locked, flavor):
    image = request.getfixturevalue("cuda_slim_image" if flavor == "slim" else "cuda_dev_image")
    got = json.loads(in_image(image, f'python -c "{PROBE}"').stdout)
    # PyPI's wheel is version 2.13.0 to pip, and names its build in torch.__version__
    assert got["torch"] == f"2.13.0+{CUDA_TAG}" and got["cuda"] == CUDA and got["available"] is False
    major, minor, patch = (int(x) for x in locked["nvidia-cudnn-cu13"].split(".")[:3])
    assert got["cudnn"] == major * 10000 + minor * 100 + patch  # cuDNN 9's version() encoding
    assert ".".join(map(str, got["nccl"])) == locked["nvidia-nccl-cu13"]


def test_every_library_torch_needs_resolves(cuda_slim_image):
    # What torch and triton load: their own libraries (ldd follows their RPATH into nvidia/*, so
    # cuBLAS, cuFFT, NVRTC, ... are checked through them), plus what cuDNN 9 dlopens at run time
    # (its engine/ops sub-libraries) and NCCL. libcuda.so.1 is the driver's: the NVIDIA
    # container runtime mounts it with `--gpus`. Left out on purpose (measured here: they do not
    # resolve and torch never loads them): nvshmem's UCX/libfabric/MPI/PMIx/ibverbs transport
    # plugins and cuFile's RDMA plugin (they need that hardware's own user-space stack),
    # libcusolverMg (multi-GPU cuSOLVER, not linked by torch) and triton's test plugins.
    script = r"""
site=$(python -c 'import site; print(site.getsitepackages()[0])')
libs=$(find "$site/torch/lib" "$site/nvidia/cudnn/lib" "$site/nvidia/nccl/lib" "$site/nvidia/cusparselt/lib" \
  "$site/nvidia/nvshmem/lib/libnvshmem_host.so.3" "$site/triton/_C" "$site/triton/backends/nvidia/lib" -name '*.so*' -type f)
echo "checked $(echo "$libs" | wc -l) $(for f in $libs; do ldd "$f"; done | grep -c "=> $site/.*nvidia/")"
for f in $libs; do ldd "$f" 2>&1 | grep 'not found' | grep -v 'libcuda\.so\.1' | sed "s|^|$f: |"; done
python -c 'import torch, torch.distributed, triton; torch.cuda.nccl.version(); print("imported")'
"""
    r = in_image(cuda_slim_image, script)
    lines = r.stdout.strip().splitlines()
    _, n_libs, n_nvidia = lines[0].split()
    assert int(n_libs) >= 25 and int(n_nvidia) > 50, r.stdout  # the CUDA libraries come from the wheels
    assert lines[1:] == ["imported"], r.stdout  # no "not found" line before it


def test_cuda_libraries_exist_once_and_no_cuda_base(cuda_slim_image):
    script = r"""
ls -d /usr/local/cuda* 2>/dev/null
find / -xdev \( -name 'libcudart.so*' -o -name 'libcublas*.so*' -o -name 'libcudnn*.so*' -o -name 'libnccl*.so*' \
  -o -name 'libcufft*.so*' -o -name 'libcurand*.so*' -o -name 'libcusparse*.so*' -o -name 'libcusolver*.so*' \
  -o -name 'libnvrtc*.so*' -o -name 'libnvJitLink*.so*' -o -name 'libcupti*.so*' -o -name 'libnvshmem*.so*' \) \
  -type f -printf '%f\n' | sort | uniq -c | awk '$1 > 1'
pip list --format=freeze | cut -d= -f1 | grep -i -E '^nvidia-' | sed -E 's/-cu1[0-9]$//' | sort | uniq -d
"""
    r = in_image(cuda_slim_image, script)
    assert r.stdout.strip() == "", f"CUDA installed twice:\n{r.stdout}"


def test_doctor_without_gpus_names_the_cause_and_reports_the_image(cuda_slim_image, cuda_project, locked):
    r = docker("run", "--rm", "--network", "none", "-v", f"{cuda_project}:/workspace:ro", cuda_slim_image,
               "capsule", "doctor", "-f", "/workspace/capsule.yaml", "--json", check=False, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr  # docs/doctor.md: 1 = an error finding
    report = json.loads(r.stdout)
    assert report["exit_code"] == 1
    first = report["findings"][0]
    assert first["id"] == "no-device-nodes" and "without GPU access" in first["message"]
    assert "--gpus all" in first["fix"]
    s = report["summary"]
    assert s["torch"] == f"2.13.0+{CUDA_TAG}" and s["torch_matches_pin"] is True
    assert s["torch_cuda"] == CUDA and s["in_container"] is True
    assert s["cudnn"] == ".".join(locked["nvidia-cudnn-cu13"].split(".")[:3])  # 9.20.0.48 -> '9.20.0'
    assert s["nccl"] == locked["nvidia-nccl-cu13"]


def test_labels_carry_torch_cuda_cudnn_nccl_and_the_driver_floor(cuda_slim_image, cuda_dev_image, locked):
    for image in (cuda_slim_image, cuda_dev_image):
        labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
        assert labels["io.torchcapsule.torch"] == "2.13.0" and labels["io.torchcapsule.cuda"] == CUDA
        assert labels["io.torchcapsule.cudnn"] == locked["nvidia-cudnn-cu13"]
        assert labels["io.torchcapsule.nccl"] == locked["nvidia-nccl-cu13"]
        assert labels["io.torchcapsule.cuda.min_driver"] == "580"
    assert cuda_slim_image == f"digits:2.13.0-{CUDA_TAG}-py3.11-slim"


def test_dev_image_has_jupyter_and_sshd_on_the_same_cuda_stack(cuda_dev_image, cuda_slim_image):
    r = in_image(cuda_dev_image, "command -v jupyter sshd gcc")
    assert len(r.stdout.split()) == 3
    size = {i: int(docker("image", "inspect", "--format", "{{.Size}}", i).stdout) for i in (cuda_slim_image, cuda_dev_image)}
    assert size[cuda_slim_image] < size[cuda_dev_image]


# -- another CUDA: only from a PyTorch index (or a mirror of it) -------------------------------
def _fake_torch_wheel(directory: Path, version: str) -> Path:
    """A tiny stand-in for a PyTorch-index torch wheel (name, version, tags are what pip reads)."""
    name = f"torch-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
    di = f"torch-{version}.dist-info"
    path = directory / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("torch/__init__.py", f"__version__ = '{version}'\n")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                  "Tag: cp311-cp311-manylinux_2_28_x86_64\n")
        z.writestr(f"{di}/RECORD", "")
    return path


def test_other_cuda_comes_from_a_torch_index_mirror(docker_engine, tmp_path):
    ensure_base_image()
    root = _copy_digits(tmp_path / "p", "13.2")
    # Without a reachable PyTorch index: one line, naming PyPI's CUDA and the fix.
    r = run_capsule("image", "lock", "--base", BASE_IMAGE, "--torch-index", "http://127.0.0.1:9/whl/cu132",
                    cwd=root, env=PYPI_ONLY, timeout=300)
    assert r.returncode != 0 and r.stderr.startswith("error: CUDA 13.2:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "CUDA 13.0 build" in r.stderr and "--torch-index" in r.stderr and "CAPSULE_TORCH_INDEX" in r.stderr
    # A local simple-index mirror holding the cu132 wheel: the lock takes torch from it.
    index = tmp_path / "simple"
    (index / "torch").mkdir(parents=True)
    wheel = _fake_torch_wheel(index / "torch", "2.13.0+cu132")
    (index / "torch" / "index.html").write_text(
        f'<html><body><a href="{wheel.name.replace("+", "%2B")}#sha256={sha256_file(wheel)}">{wheel.name}</a></body></html>\n')
    r = run_capsule("image", "lock", "--base", BASE_IMAGE, "--torch-index", index.as_uri(),
                    cwd=root, env={**PYPI_ONLY, "CAPSULE_WHEELHOUSE": str(tmp_path / "wh")}, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _, entries = lockmod.parse_lock((root / lockmod.LOCK).read_text())
    torch = next(e for e in entries if e.name == "torch")
    assert (torch.version, torch.sha256) == ("2.13.0+cu132", sha256_file(wheel))
