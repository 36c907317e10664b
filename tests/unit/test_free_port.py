"""_util.free_port: a port for a listener another process binds later (rendezvous, test servers)."""
from __future__ import annotations

import socket

from torchcapsule import _util


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    low = _util._ephemeral_low()
    for _ in range(20):
        port = _util.free_port()
        if low > 10000:  # outgoing connections take ports from the range; they cannot take this one
            assert 10000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_in_use(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        free = _util.free_port()
        monkeypatch.setattr(_util, "_ephemeral_low", lambda: 60000)
        monkeypatch.setattr("random.sample", lambda population, k: [taken, free])  # the first is taken
        assert _util.free_port() == free


def test_unknown_ephemeral_range_falls_back_to_the_kernels_pick(tmp_path, monkeypatch):
    assert _util._ephemeral_low(str(tmp_path / "missing")) == 0
    monkeypatch.setattr(_util, "_ephemeral_low", lambda: 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", _util.free_port()))
