"""Whether a stage can be skipped (pure), and its input fingerprint.

A stage's fingerprint is the SHA-256 of: the content of the files its `inputs` globs match, its
own config in capsule.yaml (command, env, resources, ...), the project image tag, and the
fingerprints of the stages it needs. A stage is skipped when that fingerprint equals the one
recorded by its last attempt and that attempt succeeded: a failed or interrupted last attempt
always reruns, as does a stage whose declared `outputs` are missing, and `--force`.

Only `hash_inputs` reads the disk; everything else is pure and unit-tested with plain data.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_VERSION = 1  # bump when the recipe changes so old records never match


def fingerprint(stage_config: Mapping, input_hashes: Mapping[str, str], image: str,
                upstream: Mapping[str, str]) -> str:
    doc = {
        "v": FINGERPRINT_VERSION,
        "stage": stage_config,
        "inputs": dict(sorted(input_hashes.items())),
        "image": image,
        "upstream": dict(sorted(upstream.items())),
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class LastAttempt:
    """What the run records say about the most recent time this stage was decided on."""

    run_id: str
    state: str  # succeeded | skipped | failed | interrupted
    fingerprint: str | None
    inputs: Mapping[str, str] | None = None  # file -> sha256 as recorded then (to say what changed)


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str
    cached_from: str | None = None  # run id whose success is reused when skipped


SUCCESS_STATES = ("succeeded", "skipped")


def changed_files(now: Mapping[str, str], before: Mapping[str, str]) -> list[str]:
    """Files added, removed or modified between two input hash maps, sorted."""
    return sorted(f for f in set(now) | set(before) if now.get(f) != before.get(f))


def decide(fp: str, last: LastAttempt | None, *, force: bool = False,
           missing_outputs: Iterable[str] = (), inputs: Mapping[str, str] | None = None) -> Decision:
    if force:
        return Decision(True, "--force")
    if last is None:
        return Decision(True, "no earlier run")
    if last.state not in SUCCESS_STATES:
        return Decision(True, f"last attempt {last.state} (run {last.run_id})")
    if last.fingerprint != fp:
        changed = changed_files(inputs, last.inputs) if inputs is not None and last.inputs is not None else []
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            return Decision(True, f"inputs changed: {', '.join(changed[:3])}{more}")
        return Decision(True, "config, image or an upstream stage changed")
    missing = list(missing_outputs)
    if missing:
        return Decision(True, f"outputs missing: {', '.join(missing)}")
    return Decision(False, f"unchanged since run {last.run_id}", cached_from=last.run_id)


# -- the one effect: reading the input files -----------------------------------------------------
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".capsule"}


def _files(root: Path, pattern: str) -> Iterable[Path]:
    for p in sorted(root.glob(pattern)):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not (_SKIP_DIRS & set(f.relative_to(root).parts)):
                    yield f
        elif p.is_file() and not (_SKIP_DIRS & set(p.relative_to(root).parts)):
            yield p


def hash_inputs(root: Path, patterns: Iterable[str]) -> dict[str, str]:
    """{relative path: sha256} of every file the globs match (a matched directory: all its files)."""
    out: dict[str, str] = {}
    for pattern in patterns:
        for f in _files(root, pattern):
            rel = f.relative_to(root).as_posix()
            if rel not in out:
                h = hashlib.sha256()
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = h.hexdigest()
    return out


def missing_outputs(root: Path, patterns: Iterable[str]) -> list[str]:
    """The declared outputs that match nothing on disk."""
    return [p for p in patterns if not any(root.glob(p))]


__all__ = ["fingerprint", "LastAttempt", "Decision", "decide", "changed_files", "hash_inputs", "missing_outputs",
           "SUCCESS_STATES", "FINGERPRINT_VERSION"]
