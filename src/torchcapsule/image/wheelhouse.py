"""The host-side wheelhouse: wheels resolved for the image's interpreter, cached under
<project>/.capsule/wheelhouse/, copied (hard-linked) into the build context.

Effects: runs `pip download` on the host (the build itself reaches no package index).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError

# manylinux_2_28 covers glibc >= 2.28 (Debian 11+, Ubuntu 20.04+); pip also accepts older tags.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TORCH_INDEX_ENV = "CAPSULE_TORCH_INDEX"


@dataclass(frozen=True)
class Target:
    """The interpreter inside the image that wheels must fit."""

    python_full: str  # e.g. "3.11.2"
    platforms: tuple[str, ...] = PLATFORMS

    @property
    def abi(self) -> str:
        major, minor = self.python_full.split(".")[:2]
        return f"cp{major}{minor}"

    def pip_args(self) -> list[str]:
        args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python_full,
                "--abi", self.abi, "--abi", "abi3", "--abi", "none"]
        for p in self.platforms:
            args += ["--platform", p]
        return args


def cache_dir(root: Path) -> Path:
    return root / ".capsule" / "wheelhouse"


def index_args(torch_index: str | None) -> list[str]:
    """The PyTorch wheel index for the chosen CUDA/CPU build, unless turned off ('none'),
    in which case pip's own configuration (index, find-links) decides. An index that does not
    answer is dropped with a warning: pip would retry it for minutes, and the pinned local
    version (torch==X+cpu / +cuXXX) still cannot be satisfied by a different build."""
    index = os.environ.get(TORCH_INDEX_ENV, torch_index)
    if not index or index == "none":
        return []
    if not _reachable(index):
        print(f"capsule: warning: the PyTorch index {index} does not answer; using pip's own configuration "
              f"(set {TORCH_INDEX_ENV}=none to skip this check)", file=sys.stderr)
        return []
    return ["--extra-index-url", index]


def _reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/", method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def pip_download(requirements: list[str], target: Target, *, cache: Path, torch_index: str | None,
                 constraints: list[str] | None = None, no_deps_lock: Path | None = None) -> list[Path]:
    """Resolve and download `requirements` for `target`; returns the files of exactly this
    resolution (also kept in `cache`). With `no_deps_lock`, fetch the locked files as they are."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="capsule-dl-", dir=cache.parent) as tmp:
        tmpd = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
               "--dest", str(tmpd / "out"), "--find-links", str(cache), *target.pip_args(),
               *index_args(torch_index)]
        if no_deps_lock is not None:
            cmd += ["--no-deps", "--require-hashes", "-r", str(no_deps_lock)]
        else:
            if constraints:
                cfile = tmpd / "constraints.txt"
                cfile.write_text("\n".join(constraints) + "\n")
                cmd += ["-c", str(cfile)]
            cmd += requirements
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageError(f"pip could not resolve the image's packages for Python {target.python_full}: "
                             f"{_pip_reason(r.stderr or r.stdout)}; fix the package list in capsule.yaml "
                             "(image.pip) or make the wheels reachable (pip config / --torch-index)")
        files = []
        for f in sorted((tmpd / "out").iterdir()):
            if not f.name.endswith(".whl"):
                raise ImageError(f"pip returned a non-wheel file {f.name}; every package needs a wheel for "
                                 f"Python {target.python_full} on {target.platforms[0]}")
            dest = cache / f.name
            if not dest.exists():
                shutil.move(str(f), dest)
            files.append(dest)
        return files


def _pip_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")]
    return (lines[0] if lines else (text.strip().splitlines() or ["unknown error"])[-1])[:300]


def materialize(files: list[Path], dest: Path) -> None:
    """Put exactly `files` into dest/ (hard links when possible: the wheelhouse is large)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in files:
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)


def project_wheel(repo_root: Path, dest: Path) -> Path:
    """Build torchcapsule's own wheel (`pip wheel --no-deps`) into dest/ for the image."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--disable-pip-version-check", "-q", "-w", str(dest), str(repo_root)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageError(f"building torchcapsule's own wheel failed: {_pip_reason(r.stderr)}; "
                         "install hatchling in this environment (pip install hatchling)")
    wheels = list(dest.glob("torchcapsule-*.whl"))
    if len(wheels) != 1:
        raise ImageError(f"expected one torchcapsule wheel in {dest}, found {len(wheels)}")
    return wheels[0]
