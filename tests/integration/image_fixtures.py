"""Reusable fixtures: the digits example's CPU images, built once per test session with the real
`capsule image build` (hermetic, from examples/digits/capsule.lock) on a local Debian base.

Use from any test module:
    from tests.integration.image_fixtures import digits_slim_image, digits_dev_image  # noqa: F401
    def test_x(digits_slim_image): ...   # -> "digits:2.13.0-cpu-py3.11-slim"
or call build_digits_image("slim") directly. The names are stable.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, REPO, missing_part, run_capsule

BASE_IMAGE = os.environ.get("CAPSULE_TEST_BASE", "local/debian:bookworm")
_built: dict[str, str] = {}
_ids: dict[str, str] = {}


def docker(*args: str, check: bool = True, timeout: float = 120, input: str | None = None
           ) -> subprocess.CompletedProcess:
    """The real docker CLI; with check, a failure is an AssertionError carrying its output."""
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def inspect(ref: str, fmt: str) -> str:
    return docker("inspect", "--format", fmt, ref).stdout.strip()


def ensure_base_image(base: str = BASE_IMAGE) -> str:
    """The local Debian base (no registry here): made by scripts/make-base-image.sh if missing."""
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode == 0:
        return base
    r = subprocess.run(["bash", str(REPO / "scripts" / "make-base-image.sh"), base],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        missing_part(f"base image {base} could not be made (scripts/make-base-image.sh needs root and "
                     f"mmdebstrap): {(r.stderr or r.stdout).strip()[-300:]}")
    return base


def build_digits_image(flavor: str, project_dir: Path = EXAMPLE) -> str:
    """Build (once per process) the digits CPU image of `flavor` and return its tag."""
    key = f"{project_dir}:{flavor}"
    if key in _built:
        return _built[key]
    ensure_base_image()
    r = run_capsule("image", "build", "--flavor", flavor, "--base", BASE_IMAGE, "--json",
                    cwd=project_dir, timeout=1500)
    if r.returncode != 0:
        raise AssertionError(f"capsule image build --flavor {flavor} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    import json

    out = json.loads(r.stdout)
    _built[key], _ids[key] = out["tag"], out["id"]
    return out["tag"]


def built_image_id(flavor: str, project_dir: Path = EXAMPLE) -> str:
    """The image id this process built for `flavor`: unlike the tag, which another build of the
    same project elsewhere on the machine may move, it names exactly the image of this checkout."""
    build_digits_image(flavor, project_dir)
    return _ids[f"{project_dir}:{flavor}"]


@pytest.fixture(scope="session")
def digits_slim_image(docker_engine) -> str:
    """Tag of the digits slim CPU image (torch 2.13.0 CPU, Python 3.11, torchcapsule installed)."""
    return build_digits_image("slim")


@pytest.fixture(scope="session")
def digits_dev_image(docker_engine) -> str:
    """Tag of the digits jupyter-ssh CPU image."""
    return build_digits_image("jupyter-ssh")
