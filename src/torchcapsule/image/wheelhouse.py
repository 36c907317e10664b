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

# Every manylinux tag a glibc >= 2.28 target accepts (Debian 11+, Ubuntu 20.04+: every default
# base). pip does not widen an explicit --platform to older tags, and several nvidia-* wheels
# that torch's CUDA build needs carry only manylinux_2_27 or older tags, so all are listed.
PLATFORMS = tuple(f"manylinux_2_{m}_x86_64" for m in range(28, 16, -1)) + ("manylinux2014_x86_64",)
TORCH_INDEX_ENV = "CAPSULE_TORCH_INDEX"
WHEELHOUSE_ENV = "CAPSULE_WHEELHOUSE"


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
    """Where downloaded wheels are kept: CAPSULE_WHEELHOUSE (one cache shared by projects and
    builds on a machine; files are named and hash-checked, so sharing is safe) or the project's."""
    shared = os.environ.get(WHEELHOUSE_ENV)
    return Path(shared) if shared else root / ".capsule" / "wheelhouse"


def index_args(torch_index: str | None, *, refuse: str | None = None) -> list[str]:
    """The PyTorch wheel index for the chosen CUDA/CPU build, unless turned off ('none'),
    in which case pip's own configuration (index, find-links) decides. An index that does not
    answer is dropped with a warning: pip would retry it for minutes, and the pinned local
    version (torch==X+cpu / +cuXXX) still cannot be satisfied by a different build. With
    `refuse` (a one-line error with an {index} field), an index that does not answer is an
    error instead: the build needs that index and nothing else has it."""
    index = os.environ.get(TORCH_INDEX_ENV) or torch_index  # set but empty: as if unset
    if not index or index == "none":
        return []
    if not _reachable(index):
        if refuse:
            raise ImageError(refuse.format(index=index))
        print(f"capsule: warning: the PyTorch index {index} does not answer; using pip's own configuration "
              f"(set {TORCH_INDEX_ENV}=none to skip this check)", file=sys.stderr)
        return []
    return ["--extra-index-url", index]


def _reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.error
    import urllib.parse
    import urllib.request

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":  # a local mirror (a simple-index directory)
        return Path(urllib.request.url2pathname(parsed.path)).is_dir()
    try:
        urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/", method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def pip_download(requirements: list[str], target: Target, *, cache: Path, torch_index: str | None,
                 constraints: list[str] | None = None, no_deps_lock: Path | None = None,
                 refuse: str | None = None) -> list[Path]:
    """Resolve and download `requirements` for `target`; returns the files of exactly this
    resolution (also kept in `cache`). With `no_deps_lock`, fetch the locked files as they are.
    `refuse`: see index_args."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="capsule-dl-", dir=cache.parent) as tmp:
        tmpd = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
               "--dest", str(tmpd / "out"), "--find-links", str(cache), *target.pip_args(),
               *index_args(torch_index, refuse=refuse)]
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
                             f"{_pip_reason(r.stderr or r.stdout)}; fix what pip names (image.pip, image.torch/cuda) "
                             "or make the wheels reachable (pip config / --torch-index)")
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
    """pip's own reason, on one line: its first ERROR line and, for a resolution conflict, the
    requirements it names under "The conflict is caused by:" (the real cause, not a guess)."""
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    reason = errors[0] if errors else next((ln for ln in reversed(lines) if ln), "unknown error")
    if "The conflict is caused by:" in lines:
        cause = []
        for ln in lines[lines.index("The conflict is caused by:") + 1:]:
            if not ln or ln.startswith(("To fix", "Additionally", "ERROR")):
                break
            cause.append(ln)
        reason += " The conflict is caused by: " + "; ".join(cause)
    return reason.removeprefix("ERROR: ")[:600]


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
