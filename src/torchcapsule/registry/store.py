"""Where the registry lives (no mlflow import): the tracking URI, the local store paths, and the
file lock that serializes writers of one SQLite store."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RegistryError

if TYPE_CHECKING:
    from ..config import Project

STORE_DIR = ".capsule"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def tracking_uri(project: "Project | None" = None) -> str:
    """registry.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite under <root>/.capsule/."""
    if project is not None and project.registry.tracking_uri:
        return project.registry.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if project is None:
        raise RegistryError(
            "no registry to use: no capsule.yaml here and $MLFLOW_TRACKING_URI is unset; "
            "pass -f PATH/capsule.yaml, --tracking-uri URI or set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{(project.root / STORE_DIR / DB_FILE).resolve()}"


def artifact_root(project: "Project") -> str | None:
    """Where the embedded store keeps artifacts (None: a remote server decides)."""
    uri = tracking_uri(project)
    if sqlite_path(uri) is None:
        return None
    return (project.root / STORE_DIR / ARTIFACTS_DIR).resolve().as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


@contextlib.contextmanager
def writer_lock(uri: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Serialize writers of one SQLite store across processes (fcntl on <db>.lock).

    SQLite allows one writer at a time and MLflow's store answers a busy database with
    "database is locked" (and first-use schema migrations race each other): holding an
    exclusive lock around each registration turns that into a short wait. Remote servers
    and other databases handle concurrency themselves: no lock there.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock"), timeout_s,
                   f"{db}: another registration held the store lock for over {timeout_s:.0f}s; "
                   "wait for it to finish or remove a stale process"):
        yield


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, on_timeout: str) -> Iterator[None]:
    """An exclusive fcntl lock on PATH across processes (released if the holder dies);
    RegistryError(on_timeout) past timeout_s."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(on_timeout) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
