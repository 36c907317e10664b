"""uvicorn's httptools protocol with limits on request heads (uvicorn sets none for httptools).

Without them an 8 MB header is answered 200 and a 64 MiB unfinished one grows the server by
~90 MB; a client that connects and sends nothing, or a byte a second, holds a connection forever.
Here a request line + headers over `max_bytes`, or more than `max_count` headers, is answered
431 and the connection closed (an unfinished head is counted as it arrives, so memory stays
bounded by one read past the limit); a head not complete `timeout_s` after the connection
opened or its first byte arrived is answered 408 and closed.

Overload (`gate`): once a request head is complete, and before any ASGI task exists or the body
is read, the gate (the app) may answer the request itself, straight onto the transport: a full
queue's 503 costs a parse and one write, so a flood of refused requests cannot take the event
loop from the batches of accepted ones. The refused request's body, if any, is discarded as it
arrives and the connection is closed once it is in: a client that re-sends at once (ignoring
Retry-After) must connect again, which paces it; on kept-alive connections such clients made
20-30 refusals per answered request, and goodput was under 900 answers/s against ~5,000 with the
close (c=256, queue 8, docs/benchmarks.md "Serve overload").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

# What a gate says about a request whose head is complete (see limited_protocol).
PASS = 0  # not the gate's business: the ASGI app handles it
RESERVED = 1  # admitted; a queue slot is held until the app releases it (scope[RESERVED_KEY])
ANSWERED = 2  # the gate wrote the whole answer; the body is to be discarded
RESERVED_KEY = "capsule.reserved"

# gate(method, target, transport) -> PASS | RESERVED | ANSWERED; an answer ends the connection
Gate = Callable[[bytes, bytes, Any], int]

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100
HEADER_TIMEOUT_S = 10.0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the status is on the protocol."""


def limited_protocol(max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADER_COUNT,
                     timeout_s: float = HEADER_TIMEOUT_S, gate: Gate | None = None) -> type:
    """A uvicorn `http=` protocol class enforcing these limits on every request head, and asking
    `gate` about each complete head before the ASGI app sees it."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0  # bytes received since the current head began
            self._head_size = 0  # bytes of the current head's parsed headers
            self._in_head = True
            self._refusal: tuple[int, str] | None = None
            # Deadlines are checked by one lazy timer per connection (re-armed only when it
            # fires early), not a timer per request: under a flood of refused requests, timer
            # churn would be a large part of a refusal's cost.
            self._head_deadline: float | None = None  # when the current head must be complete
            self._idle_deadline: float | None = None  # a refused request's body must be in by then
            self._timer = None
            self._discarding = False  # the gate answered this request: drop its body

        # -- timing ----------------------------------------------------------------------
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline = self.loop.time() + timeout_s
            self._arm(self._head_deadline)

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def _arm(self, when: float) -> None:
            # An armed timer is never later than `when`: a connection's deadlines only move
            # later (a head after the last; the idle deadline only after its last head).
            if self._timer is None:
                self._timer = self.loop.call_at(when, self._check_deadlines)

        def _check_deadlines(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            now = self.loop.time()
            head, idle = self._head_deadline, self._idle_deadline
            if head is not None and now >= head:
                self._refuse(408, f"request head not received within {timeout_s:g} s")
            elif idle is not None and now >= idle:
                self.transport.close()
            else:
                pending = [d for d in (head, idle) if d is not None]
                if pending:
                    self._arm(min(pending))

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
            if self.transport.is_closing():  # a request pipelined behind a refused one: dropped
                raise _Refused
            super().on_message_begin()
            self._in_head = True
            self._head_size = 0
            if self._head_deadline is None:
                self._head_deadline = self.loop.time() + timeout_s
                self._arm(self._head_deadline)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if len(self.headers) > max_count:
                self._refusal = (431, f"more than {max_count} request headers")
                raise _Refused
            self._head_size += len(name) + len(value) + 4
            if self._head_size + len(self.url) > max_bytes:
                self._refusal = (431, f"request head over {max_bytes} bytes")
                raise _Refused

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_deadline = None
            # Only when no earlier request on this connection is still being answered: a
            # pipelined request's answer must not overtake the one before it.
            if gate is not None and (self.cycle is None or self.cycle.response_complete) \
                    and not self.parser.should_upgrade():
                verdict = gate(self.parser.get_method(), self.url, self.transport)
                if verdict == ANSWERED:
                    # The answer said `connection: close`. The connection closes once the
                    # body's bytes are in (usually the same read), not before: closing on
                    # unread bytes would send a reset that can destroy the answer in flight.
                    self.server_state.total_requests += 1
                    self._discarding = True
                    self._idle_deadline = self.loop.time() + self.timeout_keep_alive
                    self._arm(self._idle_deadline)
                    return
                if verdict == RESERVED:
                    self.scope[RESERVED_KEY] = True  # type: ignore[literal-required]
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._discarding:
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self._discarding:
                self._discarding = False
                self.transport.close()
                return
            else:
                super().on_message_complete()
            self._in_head = True  # the next head on this connection is counted from zero
            self._head_bytes = 0

        # -- answering -------------------------------------------------------------------
        def send_400_response(self, msg: str) -> None:
            # the parser reports a callback's _Refused as a parse error: answer our status instead
            if self.transport.is_closing():
                return
            if self._refusal is not None:
                status, msg = self._refusal
                self._refusal = None
                self._refuse(status, msg)
                return
            super().send_400_response(msg)

        def _refuse(self, status: int, msg: str) -> None:
            self._refusal = (status, msg)
            self._head_deadline = self._idle_deadline = None
            body = msg.encode("ascii")
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
            self.transport.close()

    return LimitedHttpToolsProtocol
