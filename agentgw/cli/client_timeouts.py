"""uvicorn's HTTP/1.1 protocols with a deadline for reading each request.

uvicorn closes a keep-alive connection that stays idle after a response, but not one that never
sends a request, nor one that sends its headers or body a byte at a time (slow-loris): either holds
a connection and its buffers for as long as the client likes. Here every connection must start a
request within the idle timeout of opening (or of its last response), and must have sent the whole
request, headers and body, within the read timeout of starting it; otherwise it is closed.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["PROTOCOLS", "H11WithDeadline", "HttpToolsWithDeadline", "configure"]


class _Deadline:
    """The one timer of a connection: until the next request starts, or until it has been read."""

    idle_s: ClassVar[float] = 5.0
    read_s: ClassVar[float] = 30.0

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport) -> None:
        self._loop = loop
        self._transport = transport
        self._timer: asyncio.TimerHandle | None = None
        self.reading = False

    def arm(self, seconds: float, *, reading: bool) -> None:
        self.cancel()
        self.reading = reading
        self._timer = self._loop.call_later(seconds, self._expire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.reading = False

    def _expire(self) -> None:
        self._timer = None
        if not self._transport.is_closing():
            self._transport.close()


class HttpToolsWithDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, with `_Deadline`."""

    _deadline: _Deadline

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
        super().connection_made(transport)
        self._deadline = _Deadline(self.loop, transport)
        self._deadline.arm(_Deadline.idle_s, reading=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._deadline.arm(_Deadline.read_s, reading=True)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._deadline.cancel()  # the request is in; uvicorn's keep-alive timer takes over after the answer


class H11WithDeadline(H11Protocol):
    """uvicorn's h11 protocol, with `_Deadline`."""

    _deadline: _Deadline

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
        super().connection_made(transport)
        self._deadline = _Deadline(self.loop, transport)
        self._deadline.arm(_Deadline.idle_s, reading=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._deadline.reading and self.conn.their_state is h11.IDLE:
            self._deadline.arm(_Deadline.read_s, reading=True)
        super().data_received(data)
        if (
            self._deadline.reading
            and self.conn.their_state is not h11.IDLE
            and self.conn.their_state is not h11.SEND_BODY
        ):
            self._deadline.cancel()


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"httptools": HttpToolsWithDeadline, "h11": H11WithDeadline}


def configure(idle_s: float, read_s: float) -> None:
    """Set the timeouts of every connection this process accepts from now on."""
    _Deadline.idle_s = idle_s
    _Deadline.read_s = read_s
