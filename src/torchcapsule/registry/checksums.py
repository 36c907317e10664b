"""sha256 of model files, verification, and the refusal of pickled content (no mlflow, no torch)."""
from __future__ import annotations

import json
from pathlib import Path

from .._util import sha256_file
from ..errors import IntegrityError, RegistryError
from .types import CHECKSUMS, MODEL_FILES, WEIGHTS

# Suffixes of formats that unpickle on load (torch.load, joblib, cloudpickle): never accepted.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt", ".cloudpickle")
# The first bytes of a pickle stream: protocol 2+ starts with PROTO (0x80); zip-wrapped
# torch.save files start with PK. A safetensors file starts with an 8-byte little-endian length.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def digest_dir(model_dir: Path, files: tuple[str, ...] = MODEL_FILES) -> dict[str, str]:
    return {name: sha256_file(model_dir / name) for name in files if (model_dir / name).is_file()}


def is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian length, then a JSON object of that length (the whole format)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            return False
        try:
            return isinstance(json.loads(fh.read(n)), dict)
        except ValueError:
            return False


def looks_pickled(path: Path) -> bool:
    """By name or by first bytes (defence in depth: nothing here ever unpickles anyway)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(4)
    # a safetensors length can start with 0x80 too: only then is the magic ambiguous
    return head.startswith(_PICKLE_MAGIC) and not is_safetensors(path)


def check_safetensors_header(path: Path) -> None:
    """A weight file must be safetensors, never a pickle."""
    if path.suffix.lower() in PICKLE_SUFFIXES or not is_safetensors(path):
        with open(path, "rb") as fh:
            pickled = fh.read(4).startswith(_PICKLE_MAGIC)
        raise IntegrityError(
            f"{path}: {path.name} is not safetensors ({'it starts like a pickle' if pickled else 'maybe a pickle, or corrupt'}; "
            "such weights are refused, never loaded); re-export the state_dict with "
            "safetensors.torch.save_file and register again"
        )


def verify(model_dir: Path, expected: dict[str, str], *, origin: str = "") -> None:
    """Every recorded file exists and matches; the weights are safetensors; nothing pickled."""
    where = f" ({origin})" if origin else ""
    if not expected:
        raise IntegrityError(
            f"{model_dir}{where}: no recorded checksums, so its files cannot be trusted; "
            "register the model with `capsule models register`"
        )
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and looks_pickled(path):
            raise IntegrityError(
                f"{path}{where}: pickled content is refused (it could run code when loaded); "
                "store weights as model.safetensors and register again"
            )
    check_files(model_dir, expected, origin=origin)
    if (model_dir / WEIGHTS).is_file():
        check_safetensors_header(model_dir / WEIGHTS)


def check_files(model_dir: Path, expected: dict[str, str], *, origin: str = "") -> int:
    """Each recorded file exists and has its recorded sha256 (the one digest comparison: registry
    pulls and serve loads both call it); returns how many were checked."""
    where = f" ({origin})" if origin else ""
    for name, digest in sorted(expected.items()):
        path = model_dir / name
        if not path.is_file():
            raise IntegrityError(f"{path}{where}: recorded file is missing; pull the model again")
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(
                f"{path}{where}: sha256 mismatch (recorded {digest[:12]}..., found {actual[:12]}...): "
                "the file was modified after registration; pull it again or register a new version"
            )
    return len(expected)


def write_checksums(model_dir: Path, digests: dict[str, str]) -> Path:
    """sha256sum-compatible lines (`sha256sum -c checksums.sha256` checks them too)."""
    path = model_dir / CHECKSUMS
    path.write_text("".join(f"{d}  {n}\n" for n, d in sorted(digests.items())))
    return path


def read_checksums(model_dir: Path) -> dict[str, str]:
    path = model_dir / CHECKSUMS
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:  # "*name" is sha256sum's binary-mode marker
            out[name.lstrip("*")] = digest.lower()
    return out


def verify_model_dir(model_dir: str | Path) -> None:
    """Re-check a pulled model directory against its checksums.sha256 (serve calls this at load)."""
    model_dir = Path(model_dir)
    verify(model_dir, read_checksums(model_dir), origin=f"checked against {CHECKSUMS}")


def check_destination(dest: Path, *, force: bool) -> list[Path]:
    """Where `capsule models pull` may write (pure apart from listing DEST): a new or empty
    directory, or with `force` a model directory (model files and weights only, never a project).
    Returns the files to delete so no stale weights (a model.pt) stay beside the new model."""
    if dest.exists() and not dest.is_dir():
        raise RegistryError(f"{dest}: exists and is not a directory; pass -o with a new or empty directory")
    entries = sorted(dest.iterdir()) if dest.is_dir() else []
    if not entries:
        return []
    names = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not force:
        raise RegistryError(f"{dest}: not empty (holds {names}); pull into a new or empty directory, "
                            "or pass --force to replace the model directory there")
    ours = {*MODEL_FILES, CHECKSUMS}
    others = [e.name for e in entries
              if not (e.is_file() and (e.name in ours or e.suffix.lower() in (*PICKLE_SUFFIXES, ".safetensors")))]
    if others:
        raise RegistryError(f"{dest}: --force replaces a model directory, but this one also holds "
                            f"{', '.join(others[:5])}; pull into a new or empty directory")
    return [e for e in entries if e.name not in ours]
