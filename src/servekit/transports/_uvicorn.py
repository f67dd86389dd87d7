"""uvicorn's h11 protocol with a deadline for each request head (``servekit serve``).

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``),
but not one that opens and sends its request head slowly, or not at all: a slowloris
client holds the connection, and its memory, for as long as it likes (TR-14). This
protocol gives every request head ``head_timeout_s`` from its first byte (from the
connection's opening for the first request) and answers ``408 Request Timeout`` and
closes the connection when the head is not complete by then. Once the head is in,
the body is the application's to read, under its own limits. Imported only by
``servekit serve``: the ``serve`` extra (uvicorn) is needed.

The protocol also writes each response in one piece: uvicorn writes the head when
the application sends ``http.response.start`` and the body at ``http.response.body``,
two ``send`` calls and two TCP segments, so the client is woken twice and, on
loopback, the server is preempted by its woken client once per segment. The head is
held until the body's first bytes (written in the same step by servekit's
application) and goes out with them; a head whose body does not follow in that step
(a streaming response) goes out on the next pass of the event loop. Measured under
the LD-02 overload (``benchmarks/overload.py``): one wake-up of the client instead
of 1.5 per answer, and a third fewer preemptions of the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["h11_with_head_timeout"]

_MESSAGE = b"the request head was not sent in time\n"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_MESSAGE)).encode() + b"\r\n\r\n" + _MESSAGE
)


class _OneWritePerResponse:
    """The connection's transport as uvicorn's protocol sees it: a response head is
    held until the first bytes of its body, and written with them."""

    __slots__ = ("_conn", "_head", "_in_body", "_loop", "_transport")

    def __init__(
        self, transport: asyncio.Transport, conn: h11.Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._transport, self._conn, self._loop = transport, conn, loop
        self._head: bytes | None = None
        self._in_body = False  # the head of the current response was written

    def write(self, data: bytes) -> None:
        if self._conn.our_state is not h11.SEND_BODY:
            self._in_body = False  # between responses (an end of message, a 100, a 408)
        elif not self._in_body:  # the head of a response: held for its body
            self._in_body = True
            self._head = bytes(data)
            self._loop.call_soon(self.flush)  # in case the body comes later (streaming)
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        if data:
            self._transport.write(data)

    def flush(self) -> None:
        """Write a held head (its body did not follow in the same step)."""
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # the rest is the real transport's
        return getattr(self._transport, name)


def h11_with_head_timeout(head_timeout_s: float) -> type[asyncio.Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` that closes connections
    whose request head is not complete within ``head_timeout_s`` seconds, and writes
    each response's head and body in one piece."""

    class HeadTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # uvicorn hands its transport to each request's cycle, which writes through it.
            held: Any = _OneWritePerResponse(transport, self.conn, self.loop)
            super().connection_made(held)
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                # The first bytes of the next request on a kept-alive connection.
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in (or was refused)
                self._cancel_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:  # nothing of a response sent yet
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    return HeadTimeoutH11Protocol
