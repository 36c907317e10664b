"""Small effect helpers several capabilities share (ports, file digests). Standard library only."""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody uses now, for a listener that another process binds later (a rendezvous,
    a test server). Taken below the kernel's ephemeral range when there is room: a port the kernel
    hands out (bind to 0) is the kind any outgoing connection may take before the listener binds
    it, which happened on a machine busy with connections (c10d then waits out its timeout)."""
    import random

    low = _ephemeral_low()
    if low > 10000:
        for port in random.sample(range(10000, low), 64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port of the kernel's ephemeral range (0 when unknown)."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights and wheels can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def mkdir_owned(path: Path, uid: int, gid: int, mode: int | None = None) -> None:
    """Create a missing directory (and parents) owned by uid:gid when we may chown (as root), so a
    container running as that user can write there; an existing one keeps its owner."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        if mode is not None:
            d.chmod(mode)
        if os.geteuid() == 0:
            os.chown(d, uid, gid)
