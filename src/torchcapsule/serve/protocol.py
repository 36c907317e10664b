"""uvicorn's httptools protocol with limits on request heads (uvicorn sets none for httptools).

Without them an 8 MB header is answered 200 and a 64 MiB unfinished one grows the server by
~90 MB; a client that connects and sends nothing, or a byte a second, holds a connection forever.
Here a request line + headers over `max_bytes`, or more than `max_count` headers, is answered
431 and the connection closed (an unfinished head is counted as it arrives, so memory stays
bounded by one read past the limit); a head not complete `timeout_s` after the connection
opened or its first byte arrived is answered 408 and closed.
"""
from __future__ import annotations

from typing import Any

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100
HEADER_TIMEOUT_S = 10.0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the status is on the protocol."""


def limited_protocol(max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADER_COUNT,
                     timeout_s: float = HEADER_TIMEOUT_S) -> type:
    """A uvicorn `http=` protocol class enforcing these limits on every request head."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0  # bytes received since the current head began
            self._in_head = True
            self._refusal: tuple[int, str] | None = None
            self._head_timer = None

        # -- timing ----------------------------------------------------------------------
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self._refuse(408, f"request head not received within {timeout_s:g} s")

        # -- counting --------------------------------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._refusal is None and self._in_head and self._head_bytes > max_bytes:
                self._refuse(431, f"request head over {max_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._arm()

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if len(self.headers) > max_count:
                self._refusal = (431, f"more than {max_count} request headers")
                raise _Refused
            if sum(len(n) + len(v) + 4 for n, v in self.headers) + len(self.url) > max_bytes:
                self._refusal = (431, f"request head over {max_bytes} bytes")
                raise _Refused

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # the next head on this connection is counted from zero
            self._head_bytes = 0

        # -- answering -------------------------------------------------------------------
        def send_400_response(self, msg: str) -> None:
            # the parser reports a callback's _Refused as a parse error: answer our status instead
            if self._refusal is not None:
                status, msg = self._refusal
                self._refusal = None
                self._refuse(status, msg)
                return
            super().send_400_response(msg)

        def _refuse(self, status: int, msg: str) -> None:
            self._refusal = (status, msg)
            self._disarm()
            body = msg.encode("ascii")
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
            self.transport.close()

    return LimitedHttpToolsProtocol
