"""uvicorn's httptools protocol with the limits it lacks: header size and read deadlines.

Without them one client can hold memory with an endless header, or a connection forever by
sending a byte a minute (slowloris). Each connection gets a deadline for its request head
(armed when the connection opens and when each next request starts), another for the body,
and a cap on the bytes of a head; a breach answers 431 or 408 and closes the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Limits come from class attributes, set by ``guarded_protocol``."""

    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._refuse, 408)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_head or self.cycle is None or not self.cycle.response_started:
            # Nothing of a response was sent yet: say why before closing.
            reason = _REASONS[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                                 % (status, reason, len(reason) + 12,
                                    b'{"error":"' + reason + b'"}'))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        head_before = self._in_head
        super().data_received(data)
        if head_before and self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._deadline is None:
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits (uvicorn instantiates it per connection)."""
    return type("GuardedProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s})
