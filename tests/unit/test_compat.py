"""Every rule of the torch/CUDA/Python/driver/arch matrix (compat.py over data/compat.yaml)."""
from __future__ import annotations

import pytest

from torchcapsule.compat import (
    arch_list_covers,
    load_matrix,
    minor_of,
    normalize_cuda,
    sm_of,
    version_key,
)
from torchcapsule.errors import CompatError, ConfigError


@pytest.fixture(scope="module")
def m():
    return load_matrix()


# -- helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("given, want", [("cu128", "12.8"), ("12.8", "12.8"), ("CPU", "cpu"),
                                         ("cu130", "13.0"), (" cu118 ", "11.8"), ("cu1210", "121.0")])
def test_normalize_cuda(given, want):
    assert normalize_cuda(given) == want


def test_version_key_and_minor():
    assert version_key("570.26") < version_key("570.124.06") < version_key("575.51.03")
    assert version_key("2.9.1+cu128") == (2, 9, 1)
    assert version_key("580") < version_key("580.65.06")
    assert minor_of("2.10.0+cpu") == "2.10"
    assert sm_of("8.9") == "sm_89" and sm_of("10.0") == "sm_100" and sm_of("sm_61") == "sm_61"


# -- releases and combinations -------------------------------------------------------------------
def test_every_minor_from_2_6_to_2_15_present(m):
    assert list(m.releases) == ["2.6", "2.7", "2.8", "2.9", "2.10", "2.11", "2.12", "2.13", "2.14", "2.15"]
    assert m.release("2.9.1").patches == ("2.9.0", "2.9.1")
    assert m.release("2.14").patches == ("2.14.0", "2.14.1")
    assert m.latest_patch("2.12") == "2.12.1"


@pytest.mark.parametrize("torch, cuda, python", [
    ("2.6.0", "cu118", "3.9"), ("2.6.0", "12.4", "3.13"), ("2.7.1", "cu128", "3.12"),
    ("2.8.0", "12.9", "3.9"), ("2.9.1", "13.0", "3.14"), ("2.9.0", "cu126", "3.10"),
    ("2.10.0", "12.8", "3.14"), ("2.11.0", "13.0", "3.11"), ("2.12.1", "13.2", "3.12"),
    ("2.13.0", "cpu", "3.11"), ("2.14.1", "cu130", "3.11"), ("2.15.0", "cpu", "3.15"),
])
def test_existing_combinations_accepted(m, torch, cuda, python):
    m.check(torch, cuda, python)  # no exception


@pytest.mark.parametrize("torch, cuda, python, must_say", [
    # torch 2.9: cu126, cu128 stable, cu130 experimental; NOT 11.8 or 12.1
    ("2.9.1", "11.8", "3.11", ["image.cuda", "no CUDA 11.8 build", "valid: 12.6, 12.8, 13.0 or cpu"]),
    ("2.9.1", "cu121", "3.11", ["no CUDA 12.1 build", "12.6, 12.8, 13.0"]),
    ("2.7.0", "12.4", "3.11", ["no CUDA 12.4 build", "11.8, 12.6, 12.8"]),
    ("2.12.0", "12.8", "3.11", ["no CUDA 12.8 build", "12.6, 13.0, 13.2"]),   # 2.12 dropped cu128
    ("2.6.0", "13.0", "3.11", ["no CUDA 13.0 build", "11.8, 12.4, 12.6"]),
    ("2.6.0", "12.6", "3.14", ["image.python", "no wheel for Python 3.14", "3.9, 3.10, 3.11, 3.12, 3.13"]),
    ("2.9.0", "12.8", "3.9", ["image.python", "no wheel for Python 3.9", "3.10, 3.11, 3.12, 3.13, 3.14"]),
    ("2.14.1", "13.0", "3.15", ["no wheel for Python 3.15"]),
    ("2.15.0", "3.10", "3.11", ["CUDA 3.10 is not"]),
    ("2.15.0", "13.0", "3.11", ["CUDA builds of torch 2.15.0 are not confirmed", "valid: cpu", "up to 2.14.1"]),
    ("2.15.0", "cpu", "3.10", ["no wheel for Python 3.10", "3.11"]),
])
def test_invalid_combinations_refused_with_choices(m, torch, cuda, python, must_say):
    with pytest.raises(CompatError) as e:
        m.check(torch, cuda, python)
    for text in must_say:
        assert text in str(e.value)
    assert isinstance(e.value, ConfigError) and e.value.exit_code == 2


def test_unknown_cuda_lists_known(m):
    with pytest.raises(CompatError, match="known: 11.8, 12.4, 12.6, 12.8, 12.9, 13.0, 13.2 or 'cpu'"):
        m.cuda_info("12.1")


def test_unknown_and_unreleased_torch(m):
    with pytest.raises(CompatError, match="not in the compatibility matrix; supported: 2.6.0, 2.7.0"):
        m.release("1.13.1")
    with pytest.raises(CompatError, match="never released; releases of 2.8: 2.8.0"):
        m.release("2.8.3")


def test_experimental_and_default_builds(m):
    assert m.release("2.9").experimental_cuda == ("13.0",)
    assert m.release("2.8").experimental_cuda == ("12.9",)
    assert m.release("2.11").experimental_cuda == ()
    assert m.release("2.14").default_cuda == "13.0"


def test_companion_versions(m):
    assert (m.release("2.6").torchvision, m.release("2.6").torchaudio) == ("0.21", "2.6")
    assert (m.release("2.9").torchvision, m.release("2.9").torchaudio) == ("0.24", "2.9")
    assert m.release("2.13").torchvision == "0.28" and m.release("2.13").torchaudio is None
    assert m.release("2.14").torchvision == "0.29"


def test_wheel_tag(m):
    assert m.wheel_tag("12.8") == "cu128" and m.wheel_tag("cpu") == "cpu" and m.wheel_tag("cu132") == "cu132"


# -- drivers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, driver, status", [
    ("12.8", "570.26", "ok"),                # CUDA 12.8 GA's minimum
    ("12.8", "570.124.06", "ok"),
    ("12.8", "565.57.01", "minor-compat"),   # below 570.26, above the 12.x floor
    ("12.8", "535.183.01", "minor-compat"),  # 535 >= 525.60.13: runs, with limitations
    ("12.8", "525.60.13", "minor-compat"),   # exactly the floor
    ("12.8", "525.60.12", "too-old"),
    ("12.8", "470.256.02", "too-old"),
    ("13.0", "580.65.06", "ok"),             # CUDA 13.0 GA's minimum
    ("13.0", "575.57.08", "too-old"),        # a 12.x driver cannot run 13.x: different major
    ("13.0", "535.183.01", "too-old"),
    ("13.2", "580.95.05", "minor-compat"),   # 13.x floor is the 580 branch
    ("13.2", "595.45.04", "ok"),
    ("11.8", "470.256.02", "minor-compat"),  # 11.x floor 450.80.02
    ("11.8", "450.80.01", "too-old"),
    ("12.6", "560.28.03", "ok"),
])
def test_driver_status(m, cuda, driver, status):
    assert m.driver_status(cuda, driver) == status
    ok, floor = m.driver_ok(cuda, driver)
    assert ok == (status != "too-old")
    assert floor == m.cuda_info(cuda).compat_floor


def test_driver_table_values(m):
    assert m.cuda_info("12.8").min_driver == "570.26"
    assert m.cuda_info("13.0").min_driver == "580.65.06"
    assert m.cuda_info("12.6").compat_floor == "525.60.13"
    assert m.cuda_info("11.8").compat_floor == "450.80.02"
    assert m.cuda_info("13.0").min_driver_update == "580.95.05"


# -- architectures --------------------------------------------------------------------------------
def test_pascal_refused_on_cu128(m):
    for torch in ("2.7.1", "2.8.0", "2.9.1", "2.10.0", "2.11.0"):
        assert not m.arch_supported("12.8", "6.1", torch=torch), torch
        assert not m.arch_supported("12.8", "6.0", torch=torch)
    assert not m.arch_supported("12.8", "5.0")  # no Maxwell either


def test_pascal_runs_on_cu126(m):
    assert m.arch_supported("12.6", "6.1", torch="2.9.1")  # sm_60 binaries run on 6.1
    assert m.cudas_for_arch("2.9.1", "6.1") == ["12.6"]


def test_volta_refused_on_cu130(m):
    assert not m.arch_supported("13.0", "7.0")
    assert not m.arch_supported("13.0", "7.0", torch="2.9.1")
    assert not m.arch_supported("13.2", "7.0", torch="2.14.1")


def test_volta_on_cu128_depends_on_release(m):
    assert not m.arch_supported("12.8", "7.0", torch="2.7.1")   # 2.7 cu128 started at Turing
    assert m.arch_supported("12.8", "7.0", torch="2.8.0")       # restored in 2.8
    assert m.arch_supported("12.8", "7.0", torch="2.10.0")
    assert not m.arch_supported("12.8", "7.0", torch="2.11.0")  # dropped again in 2.11
    assert m.arch_supported("12.6", "7.0", torch="2.14.1")


def test_minor_arch_covered_by_same_major_binary(m):
    assert m.arch_coverage("12.8", "8.9", torch="2.9.1") == "sass"   # sm_89 (L4, 4090) via sm_86
    assert m.arch_coverage("13.0", "8.7") == "sass"
    assert m.arch_coverage("13.0", "9.0") == "sass"                  # H100 on cu130
    assert m.arch_supported("13.0", "9.0", torch="2.14.1")
    assert m.arch_coverage("13.0", "10.0") == "sass"                 # B200
    assert m.arch_coverage("13.0", "12.0") == "sass"                 # RTX 5090


def test_ptx_covers_newer_major_only(m):
    assert m.arch_coverage("13.0", "12.1") == "sass"                 # 12.1 via sm_120
    assert m.arch_coverage("13.0", "13.0") == "ptx"                  # a future major via 12.0 PTX
    assert m.arch_coverage("13.0", "11.0") is None                   # PTX never runs on older GPUs
    assert m.arch_coverage("12.6", "10.0") is None                   # cu126 has no PTX, no Blackwell
    assert m.arch_coverage("cpu", "9.0") is None


def test_arch_list_covers_torch_output():
    """Works on torch.cuda.get_arch_list() output, where PTX shows as compute_XY."""
    probed = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert arch_list_covers(probed, "8.9") == "sass"
    assert arch_list_covers(probed, "13.0") == "ptx"
    assert arch_list_covers(probed, "7.0") is None
    assert arch_list_covers(["sm_90a"], "9.0") == "sass"
    assert arch_list_covers(["sm_90a"], "9.1") is None  # arch-specific cubins run on that GPU only


# -- GPUs ----------------------------------------------------------------------------------------
def test_gpu_table(m):
    assert m.gpu("h100").cc == "9.0" and m.gpu("H100").sm == "sm_90"
    assert m.gpu("h100-pcie").bf16_tflops == 756
    assert m.gpu("GTX1080").sm == "sm_61" and m.gpu("gtx-1080").arch == "Pascal"
    assert m.gpu("nonsense") is None


@pytest.mark.parametrize("device_name, table_name", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100-PCIE"), ("NVIDIA H100 NVL", "H100-NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA GeForce GTX 1080", "GTX1080"), ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"), ("Tesla V100-SXM2-32GB", "V100"),
])
def test_gpu_for_device_name(m, device_name, table_name):
    assert m.gpu_for_device(device_name).name == table_name


def test_gpu_for_unknown_device(m):
    assert m.gpu_for_device("NVIDIA Future X1") is None


def test_every_release_cuda_has_a_driver_and_arch_entry(m):
    """The data is closed: each CUDA a release names is in the cuda and arch tables."""
    for rel in m.releases.values():
        for c in rel.cuda or ():
            assert m.cuda_info(c).archs
            assert m.archs_for(rel.patches[-1], c)
        for c in rel.archs:
            assert c in (rel.cuda or ()), (rel.minor, c)
        assert set(rel.experimental_cuda) <= set(rel.cuda or ())


# -- torchvision / torchaudio pins ------------------------------------------------------------------
def test_companion_pins(m):
    m.check_companion("2.9.1", "torchvision", "0.24.1")
    m.check_companion("2.9.1", "torchaudio", "2.9.1")
    m.check_companion("2.13.0", "numpy", "2.0.0")  # not a companion: no opinion
    with pytest.raises(CompatError, match=r"torchvision 0.21.0 does not match torch 2.13.0; valid: torchvision==0.28.\*"):
        m.check_companion("2.13.0", "torchvision", "0.21.0")
    with pytest.raises(CompatError, match="torchaudio has no release for torch 2.13"):
        m.check_companion("2.13.0", "torchaudio", "2.11.0")
    m.check_companion("2.15.0", "torchvision", "0.29.2")  # unconfirmed pairing: nothing to refuse


def test_capsule_yaml_refuses_mismatched_torchvision(tmp_path):
    from torchcapsule.config import load_project

    f = tmp_path / "capsule.yaml"
    f.write_text('name: x\nimage:\n  torch: "2.13.0"\n  pip: [numpy, "torchvision==0.21.0"]\n')
    with pytest.raises(ConfigError) as e:
        load_project(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:4: image.pip: torchvision 0.21.0") and "valid: torchvision==0.28.*" in msg
    f.write_text('name: x\nimage:\n  torch: "2.13.0"\n  pip: [numpy, "torchvision==0.28.0"]\n')
    assert load_project(f).image.pip[1] == "torchvision==0.28.0"
