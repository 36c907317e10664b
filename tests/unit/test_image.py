"""Pure parts of the image capability: spec resolution, rendering, lock format, dev argv, lint."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, run_capsule
from torchcapsule.config import load_project, parse_project
from torchcapsule.errors import CompatError, ConfigError, ImageError
from torchcapsule.image import dev, lint, lock, render, wheelhouse
from torchcapsule.image.spec import resolve
from torchcapsule.image.tags import project_tag
from torchcapsule.image.wheelhouse import Target


@pytest.fixture
def project():
    return load_project(EXAMPLE)


def test_defaults_come_from_capsule_yaml(project):
    spec = resolve(project)
    assert (spec.torch, spec.cuda, spec.python, spec.flavor) == ("2.13.0", "cpu", "3.11", "jupyter-ssh")
    assert spec.base == "debian:bookworm" and spec.base_is_default
    assert spec.tag == project_tag(project) == "digits:2.13.0-cpu-py3.11-jupyter-ssh"
    assert spec.torch_requirement == "torch==2.13.0+cpu"


def test_flags_override_and_tags_are_semantic(project):
    spec = resolve(project, torch="2.9", cuda="cu128", python="3.12", flavor="slim")
    assert spec.tag == "digits:2.9.1-cu128-py3.12-slim"
    assert spec.base == "ubuntu:24.04" and spec.cuda == "12.8" and spec.min_driver == "525.60.13"
    assert spec.torch_index.endswith("/whl/cu128")
    assert resolve(project, flavor="slim").tag == "digits:2.13.0-cpu-py3.11-slim"


@pytest.mark.parametrize("kwargs, flag", [
    ({"torch": "2.9", "cuda": "11.8"}, "--cuda: torch 2.9.1 has no CUDA 11.8 build"),
    ({"torch": "2.10.7"}, "--torch:"),
    ({"cuda": "10.2"}, "--cuda: CUDA 10.2"),
    ({"python": "3.8"}, "--python: torch 2.13.0 has no wheel for Python 3.8"),
    ({"python": "three"}, "--python: 'three'"),
    ({"flavor": "slimm"}, "--flavor: unknown flavor 'slimm' (did you mean slim?)"),
    ({"python": "3.14"}, "--python: no default base image ships Python 3.14"),
    ({"base": "bad image"}, "--base: 'bad image'"),
])
def test_bad_flags_name_the_flag(project, kwargs, flag):
    with pytest.raises(ConfigError) as e:
        resolve(project, **kwargs)
    assert str(e.value).startswith(flag)
    assert "\n" not in str(e.value)


def test_bad_yaml_field_names_the_field(tmp_path):
    p = parse_project('name: x\nimage: {python: "3.14"}\n', tmp_path / "capsule.yaml")
    with pytest.raises(ConfigError, match=r"^capsule.yaml: image.python: no default base image ships Python 3.14"):
        resolve(p)


def test_custom_base_allows_any_python(project):
    spec = resolve(project, python="3.14", base="registry.internal/ml/python:3.14")
    assert spec.base == "registry.internal/ml/python:3.14" and not spec.base_is_default


def test_torch_2_9_with_cuda_11_8_is_refused_as_compat_error(project):
    with pytest.raises(CompatError, match="valid: 12.6, 12.8, 13.0 or cpu"):
        resolve(project, torch="2.9.1", cuda="11.8")


def _df(spec):
    return render.render(spec)["Dockerfile"]


def test_jupyter_ssh_renders_all_files_and_no_baked_host_keys(project):
    files = render.render(resolve(project))
    assert set(files) == {"Dockerfile", "entrypoint.sh", "sshd_config", "jupyter_server_config.py"}
    df = files["Dockerfile"]
    assert df.count("\nFROM ") == 3  # base, builder, runtime
    assert "openssh-server" in df and "jupyter" not in render.runtime_packages(resolve(project))
    assert "rm -f /etc/ssh/ssh_host_*" in df
    assert "--no-index --find-links /wheels --require-hashes" in df
    assert "capsule.dev.lock" in df
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"' in df and "HEALTHCHECK" in df
    sshd = files["sshd_config"]
    assert "PermitRootLogin no" in sshd and "PasswordAuthentication no" in sshd
    assert "g++" in df  # torch.compile needs a compiler in the dev image


def test_slim_has_no_jupyter_ssh_docs_or_tests(project):
    spec = resolve(project, flavor="slim")
    files = render.render(spec)
    assert set(files) == {"Dockerfile", "entrypoint.sh"}
    df = files["Dockerfile"]
    assert "openssh" not in df and "capsule.dev.lock" not in df and "EXPOSE" not in df
    assert "path-exclude=/usr/share/doc/*" in df and "-name tests" in df
    assert "g++" not in df  # CPU slim: eager only


@pytest.mark.parametrize("flavor", ["jupyter-ssh", "slim"])
def test_image_is_never_root_by_default_and_strips_setuid(project, flavor):
    df = _df(resolve(project, flavor=flavor))
    users = [ln.split()[1] for ln in df.splitlines() if ln.startswith("USER ")]
    assert users == ["1000:1000"]  # numeric, so Kubernetes runAsNonRoot can check it
    assert df.index("USER 1000:1000") < df.index("ENTRYPOINT")
    assert render.SETUID_ALLOWED == () and "find / -xdev -type f -perm /6000 -exec chmod ug-s {} +" in df


def test_sshd_config_names_only_modern_algorithms():
    sshd = render.render(resolve(load_project(EXAMPLE)))["sshd_config"]
    opts = dict(ln.split(None, 1) for ln in sshd.splitlines() if ln and not ln.startswith("#"))
    assert opts["KexAlgorithms"] == "sntrup761x25519-sha512@openssh.com"
    for weak in ("sha1", "nistp", "umac-64", "group14", "cbc"):
        for key in ("KexAlgorithms", "Ciphers", "MACs", "HostKeyAlgorithms"):
            assert weak not in opts[key], (key, weak)
    assert opts["UsePAM"] == "no" and opts["PermitRootLogin"] == "no"


@pytest.mark.parametrize("value", ["0", "00", "+0", "-0", " 0", "0x0", "000000", "abc"])
def test_entrypoint_refuses_root_in_every_spelling_of_host_uid(tmp_path, value):
    """The entrypoint's own id parsing (the root path), run by the real bash on the real script."""
    import os as _os
    import subprocess

    if _os.geteuid() != 0:
        pytest.skip("the entrypoint parses HOST_UID only when started as root")
    script = tmp_path / "entrypoint.sh"
    script.write_text(render.render(resolve(load_project(EXAMPLE), flavor="slim"))["entrypoint.sh"])
    env = {"PATH": _os.environ["PATH"], "CAPSULE_USER": "root", "HOST_UID": value}
    r = subprocess.run(["bash", str(script), "touch", str(tmp_path / "ran")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and not (tmp_path / "ran").exists()
    assert r.stderr.startswith(f"capsule: error: HOST_UID={value} is ")
    env.update(HOST_UID="4321", HOST_GID=value)
    r = subprocess.run(["bash", str(script), "touch", str(tmp_path / "ran")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and not (tmp_path / "ran").exists(), r.stderr
    assert r.stderr.startswith(f"capsule: error: HOST_GID={value} is ")


def test_cuda_image_uses_torch_wheels_not_a_cuda_toolkit(project):
    spec = resolve(project, torch="2.9.1", cuda="12.8", python="3.12")
    df = _df(spec)
    assert "FROM ${BASE_IMAGE} AS base" in df and "ARG BASE_IMAGE=ubuntu:24.04" in df
    assert "nvidia/cuda" not in df and "cuda-toolkit" not in df and "cuda-" not in " ".join(render.runtime_packages(spec))
    assert "NVIDIA_VISIBLE_DEVICES=all" in df and "CAPSULE_MIN_DRIVER=525.60.13" in df
    assert "g++" in df  # Triton compiles its launcher at run time, even in slim
    assert "g++" in _df(spec.with_flavor("slim"))


def test_python_mismatch_stops_the_build_with_a_clear_error(project):
    df = _df(resolve(project, python="3.12", base="my/base:1"))
    assert 'if [ "$have" != "3.12" ]' in df and "exit 3" in df
    assert "pass --base with an image whose python3 is 3.12" in df


def test_labels_record_versions(project):
    df = _df(resolve(project))
    for label in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                  "io.torchcapsule.torch=\"2.13.0\"", "io.torchcapsule.cuda=\"cpu\""):
        assert label in df


@pytest.mark.parametrize("cuda, python", [("cpu", "3.11"), ("12.6", "3.12"), ("13.0", "3.10")])
@pytest.mark.parametrize("flavor", ["jupyter-ssh", "slim"])
def test_hadolint_has_no_findings(project, tmp_path, cuda, python, flavor):
    spec = resolve(project, cuda=cuda, python=python, flavor=flavor)
    render.write(render.render(spec), tmp_path)
    assert lint.lint_file(tmp_path / "Dockerfile") == []


def test_entrypoint_is_valid_bash(project, tmp_path):
    render.write(render.render(resolve(project)), tmp_path)
    ep = tmp_path / "entrypoint.sh"
    assert ep.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(ep)]).returncode == 0


def test_lock_round_trip_and_inputs(project, tmp_path):
    spec = resolve(project)
    target = Target("3.11.2")
    w = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    w.write_bytes(b"x")
    e = lock.entry_for(w)
    assert (e.name, e.version) == ("torch", "2.13.0+cpu")
    text = lock.format_lock([e], spec=spec, target=target, dev=False)
    got, entries = lock.parse_lock(text)
    assert got == lock.inputs_hash(spec, target) and entries == [e]
    # Inputs change when the package list or the interpreter does: a stale lock is detected.
    other = resolve(project.model_copy(update={"image": project.image.model_copy(update={"pip": ("pandas",)})}))
    assert lock.inputs_hash(other, target) != got
    assert lock.inputs_hash(spec, Target("3.11.9")) != got


def test_example_lock_is_committed_and_pins_torch_with_hashes():
    got, entries = lock.parse_lock((EXAMPLE / "capsule.lock").read_text())
    names = {e.name: e for e in entries}
    assert names["torch"].version == "2.13.0+cpu" and len(names["torch"].sha256) == 64
    assert {"numpy", "scikit-learn", "safetensors", "pydantic", "click"} <= set(names)
    _, dev_entries = lock.parse_lock((EXAMPLE / "capsule.dev.lock").read_text())
    assert "jupyterlab" in {e.name for e in dev_entries} and not set(names) & {e.name for e in dev_entries}


def _opts(**kw):
    base = dict(image="digits:x", name="digits-dev",
                volumes={v: Path(f"/h/{v}") for v in dev.VOLUMES},
                token_file=Path("/h/.capsule/dev/t"), pubkey_file=Path("/home/u/.ssh/id_ed25519.pub"),
                host_uid=1001, host_gid=1002)
    base.update(kw)
    return dev.DevOptions(**base)


def _after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_dev_argv_is_safe_by_default():
    argv = dev.docker_run_argv(_opts(home=Path("/h/.capsule/dev/digits-dev/home")))
    cmd = " ".join(argv)
    assert "-p 127.0.0.1:8888:8888" in cmd and "-p 127.0.0.1:2222:2222" in cmd
    assert "--ipc=host" in argv and "--gpus" not in argv
    for v in dev.VOLUMES:
        assert f"/h/{v}:/{v}" in cmd
    # never root: runs as the host user, no capabilities, no privilege gain, fresh /run/capsule
    assert _after(argv, "--user") == ["1001:1002"] and "HOST_UID" not in cmd
    assert _after(argv, "--security-opt") == ["no-new-privileges"] and _after(argv, "--cap-drop") == ["ALL"]
    assert "--cap-add" not in argv and "--privileged" not in argv
    assert _after(argv, "--tmpfs") == ["/run/capsule:rw,nosuid,nodev,noexec,mode=0700,uid=1001,gid=1002"]
    assert "/h/.capsule/dev/digits-dev/home:/home/mluser" in _after(argv, "-v")
    assert "--read-only" not in argv
    assert "/home/u/.ssh/id_ed25519.pub:/run/secrets/capsule_authorized_keys:ro" in cmd
    assert "JUPYTER_TOKEN=" not in cmd  # the token travels in a file, not in `docker inspect`
    assert argv[-2:] == ["digits:x", "dev"]


def test_dev_argv_public_gpus_shm_and_host_network():
    cmd = " ".join(dev.docker_run_argv(_opts(public=True, gpus=True, ipc_host=False, shm_size="16g")))
    assert "-p 0.0.0.0:8888:8888" in cmd and "--gpus all" in cmd and "--shm-size=16g" in cmd
    argv = dev.docker_run_argv(_opts(network="host", jupyter_port=18888, ssh_port=12222))
    assert "-p" not in argv and "--network" in argv
    assert {"JUPYTER_IP=127.0.0.1", "JUPYTER_PORT=18888", "SSH_BIND=127.0.0.1", "SSH_PORT=12222"} <= set(argv)


def test_dev_argv_read_only_gives_tmpfs_for_what_is_written():
    argv = dev.docker_run_argv(_opts(read_only=True))
    assert "--read-only" in argv
    tmpfs = _after(argv, "--tmpfs")
    assert tmpfs[0].startswith("/run/capsule:") and tmpfs[1] == "/tmp:rw,exec,nosuid,nodev,mode=1777"


def test_dev_connect_info():
    info = dev.connect_info(_opts(), "tok", "mluser", "digits-dev")
    assert info["jupyter_url"] == "http://127.0.0.1:8888/lab?token=tok"
    assert info["ssh"] == "ssh -i /home/u/.ssh/id_ed25519 -p 2222 mluser@127.0.0.1"
    assert "Host digits-dev" in info["ssh_config"] and "Port 2222" in info["ssh_config"]


def test_cli_render_and_dry_run(tmp_path):
    r = run_capsule("image", "render", "-f", str(EXAMPLE), "--flavor", "slim", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "Dockerfile").is_file() and (tmp_path / "out" / "entrypoint.sh").is_file()
    r = run_capsule("dev", "-f", str(EXAMPLE), "--dry-run", "--no-gpus", "--jupyter-port", "18888")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("docker run -d --name digits-dev") and "127.0.0.1:18888:8888" in r.stdout


def test_cli_bad_flags_one_line(tmp_path):
    r = run_capsule("image", "render", "-f", str(EXAMPLE), "--torch", "2.9", "--cuda", "11.8", "-o", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --cuda: torch 2.9.1 has no CUDA 11.8 build (no such wheel on the PyTorch index); valid: 12.6, 12.8, 13.0 or cpu"]
    assert not any(tmp_path.iterdir())
    r = run_capsule("image", "render", "-f", str(EXAMPLE), "--flavor", "fat")
    assert r.returncode == 2 and r.stderr.startswith("error: --flavor: unknown flavor 'fat'")
    r = run_capsule("dev", "-f", str(EXAMPLE), "--dry-run", "--key", str(tmp_path / "nope.pub"))
    assert r.returncode == 2 and "--key:" in r.stderr


def test_cli_lint_passes():
    r = run_capsule("image", "lint", "-f", str(EXAMPLE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no findings" in r.stdout


def test_dev_maps_to_the_workspace_owner_under_root(tmp_path, monkeypatch):
    import os as _os

    from torchcapsule.cli.image import _host_ids

    (tmp_path / "capsule.yaml").write_text("name: x\n")
    project = load_project(tmp_path)
    monkeypatch.setattr(_os, "getuid", lambda: 0)
    monkeypatch.setattr(_os, "getgid", lambda: 0)
    _os.chown(tmp_path, 4242, 4243) if _os.geteuid() == 0 else pytest.skip("needs root to chown")
    image_ids = (1000, 1000)
    assert _host_ids(project, None, None, image_ids) == (4242, 4243, True)
    assert _host_ids(project, 1500, None, image_ids) == (1500, 1500, True)
    assert _host_ids(project, 1500, 77, image_ids) == (1500, 77, True)
    _os.chown(tmp_path, 0, 0)
    # a root-owned project: the image's own user, never root
    assert _host_ids(project, None, None, image_ids) == (1000, 1000, False)


@pytest.mark.parametrize("flag", ["--uid", "--gid"])
def test_dev_refuses_root_ids_in_one_line(tmp_path, flag):
    r = run_capsule("dev", "-f", str(EXAMPLE), "--dry-run", "--no-gpus", "--uid", "1234", flag, "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} 0: the dev box never runs as root")


def test_dev_creates_missing_volumes_owned_by_the_requested_ids(tmp_path):
    import os as _os

    from torchcapsule._util import mkdir_owned as _mkdir_owned

    if _os.geteuid() != 0:
        pytest.skip("needs root to chown")
    (tmp_path / "data").mkdir()
    _os.chown(tmp_path / "data", 5, 5)  # an existing directory keeps its owner
    for name in ("data", "models", "logs/deep"):
        _mkdir_owned(tmp_path / name, 1234, 1235)
    assert (tmp_path / "data").stat().st_uid == 5
    for p in (tmp_path / "models", tmp_path / "logs", tmp_path / "logs" / "deep"):
        assert (p.stat().st_uid, p.stat().st_gid) == (1234, 1235)
    _mkdir_owned(tmp_path / "home", 1234, 1235, mode=0o700)
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700


def test_build_failure_message_is_one_line_naming_step_and_cause():
    from torchcapsule.image.build import _failure

    tail = ["Step 12/32 : RUN apt-get update  && apt-get install -y --no-install-recommends tini nope-pkg",
            " ---> Running in 1234", "Reading package lists...",
            "\x1b[91mE: Unable to locate package nope-pkg\n\x1b[0m",
            "The command '/bin/bash -o pipefail -c apt-get update' returned a non-zero code: 100"]
    msg = _failure(tail[0], tail, None, "x:1")
    assert "\n" not in msg and msg.startswith("docker build failed at Step 12/32")
    assert "E: Unable to locate package nope-pkg" in msg and msg.endswith("x:1 was not tagged")


# -- CUDA from PyPI or from a PyTorch index (issue 15) ----------------------------------------------
def test_pypis_cuda_build_is_pinned_without_a_local_label_and_needs_no_torch_index(project):
    spec = resolve(project, cuda="13.0", flavor="slim")
    assert spec.pypi_cuda == "13.0" and spec.torch_from_pypi
    # `===`: a +cpu wheel in a find-links directory or the wheelhouse cannot satisfy it
    assert spec.torch_requirement == "torch===2.13.0"
    assert spec.torch_index_for(None) is None and spec.torch_index_for("file:///m") == "file:///m"
    assert lock.refusal(spec) is None
    other = resolve(project, cuda="13.2")
    assert not other.torch_from_pypi and other.torch_requirement == "torch==2.13.0+cu132"
    assert other.torch_index_for(None) == "https://download.pytorch.org/whl/cu132"
    assert lock.refusal(resolve(project)) is None  # CPU: pip's own configuration decides, as before


def test_another_cuda_without_a_reachable_index_is_refused_in_one_line(project, monkeypatch, capsys):
    monkeypatch.delenv(wheelhouse.TORCH_INDEX_ENV, raising=False)
    spec = resolve(project, cuda="13.2")
    with pytest.raises(ImageError) as e:
        wheelhouse.index_args("http://127.0.0.1:9/whl/cu132", refuse=lock.refusal(spec))
    msg = str(e.value)
    assert msg.startswith("CUDA 13.2: torch 2.13.0+cu132 comes only from a PyTorch wheel index and "
                          "http://127.0.0.1:9/whl/cu132 does not answer; PyPI's torch 2.13.0 is the CUDA 13.0 build")
    assert "--torch-index URL (or CAPSULE_TORCH_INDEX)" in msg and "\n" not in msg
    # without a refusal (CPU), the unreachable index is dropped with a warning, as before
    assert wheelhouse.index_args("http://127.0.0.1:9/whl/cpu") == []
    assert "does not answer" in capsys.readouterr().err


def test_a_local_simple_index_directory_counts_as_reachable(tmp_path, monkeypatch):
    monkeypatch.delenv(wheelhouse.TORCH_INDEX_ENV, raising=False)
    assert wheelhouse.index_args(tmp_path.as_uri(), refuse="x {index}") == ["--extra-index-url", tmp_path.as_uri()]
    with pytest.raises(ImageError, match="^x file://"):
        wheelhouse.index_args((tmp_path / "absent").as_uri(), refuse="x {index}")


def test_every_manylinux_tag_from_2_28_down_is_asked_for():
    args = Target("3.11.2").pip_args()
    plats = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert plats[0] == "manylinux_2_28_x86_64" and "manylinux_2_27_x86_64" in plats  # nvidia-cudnn-cu13
    assert plats[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"] and len(plats) == 13


PIP_CONFLICT = """\
ERROR: Cannot install torch==2.13.0+cu130 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested torch==2.13.0+cu130
    The user requested (constraint) torch<=2.14.1

To fix this you could try to:
1. loosen the range of package versions you've specified
ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_pips_own_resolution_reason_is_quoted():
    reason = wheelhouse._pip_reason(PIP_CONFLICT)
    assert reason == ("Cannot install torch==2.13.0+cu130 because these package versions have conflicting "
                      "dependencies. The conflict is caused by: The user requested torch==2.13.0+cu130; "
                      "The user requested (constraint) torch<=2.14.1")
    missing = ("ERROR: Could not find a version that satisfies the requirement nvidia-nccl-cu13==2.29.7 "
               "(from versions: none)\nERROR: No matching distribution found for nvidia-nccl-cu13==2.29.7\n")
    assert wheelhouse._pip_reason(missing).startswith("Could not find a version that satisfies the requirement "
                                                      "nvidia-nccl-cu13==2.29.7")


def test_cuda_dockerfile_checks_torchs_cuda_in_the_builder_and_labels_the_driver_floor(project):
    df = _df(resolve(project, cuda="13.0", flavor="slim"))
    assert "and c == '13.0'" in df and "not 2.13.0 for cu130" in df
    assert 'io.torchcapsule.cuda.min_driver="580"' in df
    cpu = _df(resolve(project, flavor="slim"))
    assert "and c == None" in cpu and "min_driver" not in cpu


def test_cuda_components_come_from_the_locks_nvidia_wheels():
    entries = [lock.Entry("nvidia-cudnn-cu13", "9.20.0.48", "0" * 64, ""), lock.Entry("nvidia-nccl-cu13", "2.29.7", "1" * 64, ""),
               lock.Entry("nvidia-cudnn-frontend", "1.0", "2" * 64, ""), lock.Entry("torch", "2.13.0", "3" * 64, "")]
    assert lock.cuda_components(entries) == {"cudnn": "9.20.0.48", "nccl": "2.29.7"}
    assert lock.cuda_components(entries[3:]) == {}


def test_a_shared_wheelhouse_is_used_when_set(tmp_path, monkeypatch):
    monkeypatch.delenv(wheelhouse.WHEELHOUSE_ENV, raising=False)
    assert wheelhouse.cache_dir(tmp_path) == tmp_path / ".capsule" / "wheelhouse"
    monkeypatch.setenv(wheelhouse.WHEELHOUSE_ENV, str(tmp_path / "shared"))
    assert wheelhouse.cache_dir(tmp_path / "p") == tmp_path / "shared"


def test_compilers_are_a_choice_in_capsule_yaml(project):
    def with_compilers(value):
        return project.model_copy(update={"image": project.image.model_copy(update={"compilers": value})})

    cuda_slim = resolve(project, cuda="13.0", flavor="slim")
    assert cuda_slim.needs_compiler and not resolve(project, flavor="slim").needs_compiler  # the defaults
    eager = resolve(with_compilers(False), cuda="13.0", flavor="slim")
    assert not eager.needs_compiler and "g++" not in _df(eager)
    assert "g++" in _df(resolve(with_compilers(True), flavor="slim"))
    assert parse_project("name: x\nimage: {compilers: false}\n", Path("capsule.yaml")).image.compilers is False


def test_an_empty_torch_index_variable_is_as_if_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(wheelhouse.TORCH_INDEX_ENV, "")
    with pytest.raises(ImageError, match="^x http://127.0.0.1:9/"):
        wheelhouse.index_args("http://127.0.0.1:9/", refuse="x {index}")
