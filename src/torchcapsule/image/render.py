"""Pure rendering: BuildSpec -> the files of a build context (Dockerfile, entrypoint, configs).

No Docker, no disk reads beyond the packaged templates; `write()` is the one effect.
"""
from __future__ import annotations

from pathlib import Path

from .spec import BuildSpec

TEMPLATES = ("Dockerfile.j2", "entrypoint.sh", "sshd_config", "jupyter_server_config.py")
# setuid/setgid files the image keeps; every other one loses its bits (tests assert the image).
SETUID_ALLOWED: tuple[str, ...] = ()


def runtime_packages(spec: BuildSpec) -> list[str]:
    """Debian/Ubuntu packages of the runtime stage (names exist in both distributions)."""
    pkgs = ["ca-certificates", "tini"]
    if spec.needs_compiler:
        # gcc/g++ and Python.h: torch.compile builds kernels (Inductor) and launchers (Triton).
        pkgs += ["gcc", "g++", "libc6-dev", "python3-dev"]
    if spec.has_dev_tools:
        # libnss-wrapper: a passwd entry for the host uid that sshd runs and logs in as (entrypoint.sh)
        pkgs += ["openssh-server", "openssh-client", "libnss-wrapper", "git", "tmux", "vim", "wget", "less",
                 "procps"]
    pkgs += [p for p in spec.apt if p not in pkgs]
    return pkgs


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("torchcapsule.image", "templates"),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False,
    )


def render(spec: BuildSpec) -> dict[str, str]:
    """{file name: content} for the build context of `spec`."""
    env = _env()
    files = {"Dockerfile": env.get_template("Dockerfile.j2").render(spec=spec, runtime_packages=runtime_packages(spec),
                                                                     setuid_allowed=SETUID_ALLOWED),
             "entrypoint.sh": env.get_template("entrypoint.sh").render()}
    if spec.has_dev_tools:
        files["sshd_config"] = env.get_template("sshd_config").render()
        files["jupyter_server_config.py"] = env.get_template("jupyter_server_config.py").render()
    return files


def naive_dockerfile(spec: BuildSpec) -> str:
    """The single-stage Dockerfile teams often write by hand, for the size benchmark only:
    one stage, build tools and apt lists kept, wheels copied into the final image."""
    pkgs = " ".join(runtime_packages(spec) + ["python3-venv", "build-essential"])
    dev = " -r /tmp/lock/capsule.dev.lock" if spec.has_dev_tools else ""
    return (
        f"FROM {spec.base}\n"
        "ENV DEBIAN_FRONTEND=noninteractive\n"
        f"RUN apt-get update && apt-get install -y {pkgs}\n"
        "COPY . /src\n"
        "RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-index --find-links /src/wheels "
        f"-r /src/capsule.lock{dev.replace('/tmp/lock', '/src')} && /opt/venv/bin/pip install --no-deps /src/capsule-wheel/*.whl\n"
        "ENV PATH=/opt/venv/bin:$PATH\n"
        'CMD ["bash"]\n'
    )


def write(files: dict[str, str], directory: Path) -> list[Path]:
    """Write the rendered files (entrypoint executable); returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in files.items():
        path = directory / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        if name.endswith(".sh"):
            tmp.chmod(0o755)
        tmp.replace(path)  # never leave a half-written file behind
        out.append(path)
    return out
