"""uvicorn's h11 protocol with a deadline for each request head (``servekit serve``).

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``),
but not one that opens and sends its request head slowly, or not at all: a slowloris
client holds the connection, and its memory, for as long as it likes (TR-14). This
protocol gives every request head ``head_timeout_s`` from its first byte (from the
connection's opening for the first request) and answers ``408 Request Timeout`` and
closes the connection when the head is not complete by then. Once the head is in,
the body is the application's to read, under its own limits. Imported only by
``servekit serve``: the ``serve`` extra (uvicorn) is needed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["h11_with_head_timeout"]

_MESSAGE = b"the request head was not sent in time\n"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_MESSAGE)).encode() + b"\r\n\r\n" + _MESSAGE
)


def h11_with_head_timeout(head_timeout_s: float) -> type[asyncio.Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` that closes connections
    whose request head is not complete within ``head_timeout_s`` seconds."""

    class HeadTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
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
