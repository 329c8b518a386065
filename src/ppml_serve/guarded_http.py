"""uvicorn's httptools protocol with the limits it lacks: header size and read deadlines.

Without them one client can hold memory with an endless header, or a connection forever by
sending a byte a minute (slowloris). Each connection gets a deadline for its request head
(armed when the connection opens and when each next request starts), another for the body,
and a cap on the bytes of a head; a breach answers 431 or 408 and closes the connection.

It also reads large bodies straight into one buffer. uvicorn's protocol receives bytes
objects and copies a body three times on its way to the app (parser chunk, a growing
bytearray, the ASGI message); for a 600 KB tensor body that, with the Python calls per
chunk, is a measurable share of the gateway's CPU. As a buffered protocol, this one lets the
transport (and TLS) write a body declared by Content-Length directly into a buffer of that
size; the parser sees only request heads. As uvicorn does, it reads a body only once the app
asks for it (after authentication), and a body the app answered without reading is read and
dropped, never stored: a client without a key cannot make the gateway hold its bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import httptools
import numpy as np
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


_HEAD_BUFFER_BYTES = 64 * 1024
DIRECT_BODY_MIN_BYTES = 64 * 1024
"""Smaller bodies take uvicorn's usual path: one chunk, nothing to save."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Limits come from class attributes, set by ``guarded_protocol``."""

    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_body_bytes = 64 * 1024 * 1024
    """Bodies read directly are at most this large (larger ones are refused by the app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._head_buffer = memoryview(bytearray(_HEAD_BUFFER_BYTES))
        self._body: np.ndarray[Any, np.dtype[np.uint8]] | None = None  # read directly
        self._body_view = memoryview(b"")
        self._filled = 0

    def _keeping_body(self) -> bool:
        """Body bytes are kept until the request is answered without them."""
        return not self.cycle.response_complete

    # As a buffered protocol (through BufferedConnection): where to put the next bytes.
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is None:
            return self._head_buffer
        if self._keeping_body():
            return self._body_view[self._filled:]
        return self._head_buffer[:self._body.size - self._filled]  # answered: read to drop

    def buffer_updated(self, nbytes: int) -> None:
        if self.transport.is_closing():
            return  # refused or finished: what still arrives is not parsed, only dropped
        if self._body is None:
            self.data_received(self._head_buffer[:nbytes])  # type: ignore[arg-type]
            return
        self._unset_keepalive_if_required()  # an early answer armed it: the body still comes
        self._filled += nbytes
        if self._filled == self._body.size:
            # The parser was left before the body; a fresh one reads the next request.
            self.parser = httptools.HttpRequestParser(self)
            with contextlib.suppress(AttributeError):  # as uvicorn: httptools < 0.6.3 lacks it
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self.on_message_complete()

    def _declared_length(self) -> int | None:
        length = None
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
        return length

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            super().on_body(body)
            return
        end = self._filled + len(body)  # the part of the body read with its head
        if self._keeping_body():
            self._body_view[self._filled:end] = body
        self._filled = end

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
        length = self._declared_length()
        if (length is not None and DIRECT_BODY_MIN_BYTES <= length <= self.max_body_bytes
                and not self.parser.should_upgrade()):
            # Not zeroed (bytearray would be): every byte is written before the app sees it.
            self._body = np.empty(length, np.uint8)
            self._body_view = self._body.data
            self._filled = 0
            self.flow.pause_reading()  # until the app asks for the body (uvicorn resumes)

    def on_message_complete(self) -> None:
        self._disarm()
        if self._body is not None:
            if self._keeping_body():
                self.cycle.body = self._body  # type: ignore[assignment]  # uvicorn only bytes() it
            self._body, self._body_view = None, memoryview(b"")
        super().on_message_complete()


class BufferedConnection(asyncio.BufferedProtocol):
    """What the transport sees of a connection. uvloop (like asyncio) writes into a
    protocol's buffer only if it is not also a plain ``asyncio.Protocol``, which uvicorn's
    protocol is; this forwards everything else to it."""

    http_class: type[GuardedHttpToolsProtocol] = GuardedHttpToolsProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.http = self.http_class(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def eof_received(self) -> None:
        self.http.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)


def guarded_protocol(max_header_bytes: int, header_timeout_s: float,
                     body_timeout_s: float, max_body_bytes: int = 64 * 1024 * 1024
                     ) -> type[asyncio.Protocol]:
    """A protocol class with these limits (uvicorn instantiates it per connection)."""
    http = type("GuardedProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s, "max_body_bytes": max_body_bytes})
    connection = type("GuardedConnection", (BufferedConnection,), {"http_class": http})
    # uvicorn's Config is typed for asyncio.Protocol classes; it only instantiates this one.
    return cast(type[asyncio.Protocol], connection)
