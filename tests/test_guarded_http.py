"""The gateway's HTTP protocol reads large bodies straight into one buffer (the parser sees
only request heads). Against a real uvicorn server on uvloop, over TLS and plain TCP: every
byte of every body reaches the app, whatever the framing of the stream (keep-alive,
pipelining, a body in slow pieces, an early answer, 100-continue, chunked encoding, a client
gone)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from ppml_serve.crypto.tls import client_context, ensure_dev_pki
from ppml_serve.guarded_http import DIRECT_BODY_MIN_BYTES, guarded_protocol

MAX_BODY = 4 * 1024 * 1024
BIG = DIRECT_BODY_MIN_BYTES * 10 + 7  # read directly; odd so no read lines up with it


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers each request with the length and SHA-256 of its body; /early answers 401
    without reading the body; /lost records whether the client went away."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":
        await _answer(send, 401, b"no")
        return
    body, digest = 0, hashlib.sha256()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            _app_state["disconnects"] += 1
            return
        assert isinstance(message["body"], bytes)  # ASGI: the app gets bytes
        body += len(message["body"])
        digest.update(message["body"])
        if not message.get("more_body"):
            break
    await _answer(send, 200, b"%d %s" % (body, digest.hexdigest().encode()))


_app_state = {"disconnects": 0}


async def _answer(send: Any, status: int, content: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"%d" % len(content))]})
    await send({"type": "http.response.body", "body": content})


def _serve(tls: tuple[Path, Path] | None) -> uvicorn.Server:
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, loop="uvloop", log_level="error",
                            http=guarded_protocol(16 * 1024, 5.0, 5.0, MAX_BODY),
                            lifespan="off", access_log=False,
                            ssl_certfile=str(tls[0]) if tls else None,
                            ssl_keyfile=str(tls[1]) if tls else None)
    return uvicorn.Server(config)


@pytest.fixture(scope="module", params=["tls", "plain"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ssl.SSLContext | None]]:
    pki = ensure_dev_pki(tmp_path_factory.mktemp("pki"))
    tls = (pki.cert_file, pki.key_file) if request.param == "tls" else None
    served = _serve(tls)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not served.started:
        if time.monotonic() > deadline:
            pytest.fail("the test server did not start")
        time.sleep(0.02)
    port = served.servers[0].sockets[0].getsockname()[1]
    yield port, client_context(pki.ca_file) if tls else None
    served.should_exit = True
    thread.join(10)


def _connect(server: tuple[int, ssl.SSLContext | None]) -> socket.socket:
    port, context = server
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost") if context else raw


def _request(body: bytes, path: str = "/echo", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), len(body), extra)) + body


def _responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses from the stream, each (status, body)."""
    buffered, found = b"", []
    while len(found) < count:
        while b"\r\n\r\n" not in buffered:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(found)} responses")
            buffered += chunk
        head, buffered = buffered.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buffered) < length:
            buffered += sock.recv(65536)
        found.append((int(head[9:12]), buffered[:length]))
        buffered = buffered[length:]
    return found


def _expected(body: bytes) -> tuple[int, bytes]:
    return 200, b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


def _bodies(sizes: list[int]) -> list[bytes]:
    return [bytes((i * 7 + n) % 251 for i in range(256)) * (n // 256) + b"x" * (n % 256)
            for n in sizes]


def test_keep_alive_mixes_direct_and_small_bodies(server: tuple[int, ssl.SSLContext | None]
                                                  ) -> None:
    bodies = _bodies([BIG, 10, BIG + 1, DIRECT_BODY_MIN_BYTES, DIRECT_BODY_MIN_BYTES - 1, 0])
    with _connect(server) as sock:
        for body in bodies:  # one at a time: each parsed by a fresh or reused parser
            sock.sendall(_request(body))
            assert _responses(sock, 1) == [_expected(body)]


def test_pipelined_requests_are_answered_in_order(server: tuple[int, ssl.SSLContext | None]
                                                  ) -> None:
    bodies = _bodies([BIG, 300, BIG * 2, 5])
    with _connect(server) as sock:
        sock.sendall(b"".join(_request(body) for body in bodies))
        assert _responses(sock, len(bodies)) == [_expected(body) for body in bodies]


def test_a_body_in_slow_pieces_arrives_whole(server: tuple[int, ssl.SSLContext | None]) -> None:
    body = _bodies([BIG])[0]
    message = _request(body)
    with _connect(server) as sock:
        for start in range(0, len(message), 100_003):  # pieces cut across head and body
            sock.sendall(message[start:start + 100_003])
            time.sleep(0.02)
        assert _responses(sock, 1) == [_expected(body)]


def test_an_early_answer_leaves_the_connection_usable(server: tuple[int, ssl.SSLContext | None]
                                                      ) -> None:
    big, after = _bodies([BIG * 3, BIG])
    with _connect(server) as sock:
        sock.sendall(_request(big, "/early"))
        assert _responses(sock, 1) == [(401, b"no")]
        sock.sendall(_request(after))
        assert _responses(sock, 1) == [_expected(after)]


def test_chunked_and_oversized_bodies_take_the_usual_path(
        server: tuple[int, ssl.SSLContext | None]) -> None:
    body = _bodies([BIG])[0]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (body[:70_000], body[70_000:])) + b"0\r\n\r\n"
    huge = _bodies([MAX_BODY + 1])[0]  # declared beyond the direct read's bound
    with _connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunked)
        assert _responses(sock, 1) == [_expected(body)]
        sock.sendall(_request(huge))
        assert _responses(sock, 1) == [_expected(huge)]


def test_a_client_gone_mid_body_is_seen_and_the_server_goes_on(
        server: tuple[int, ssl.SSLContext | None]) -> None:
    body = _bodies([BIG])[0]
    before = _app_state["disconnects"]
    with _connect(server) as sock:
        sock.sendall(_request(body)[: len(body) // 2])
    deadline = time.monotonic() + 5
    while _app_state["disconnects"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _app_state["disconnects"] == before + 1
    with _connect(server) as sock:
        sock.sendall(_request(body))
        assert _responses(sock, 1) == [_expected(body)]


def test_expect_100_continue_gets_its_go_ahead_before_the_body(
        server: tuple[int, ssl.SSLContext | None]) -> None:
    body = _bodies([BIG])[0]
    with _connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nExpect: 100-continue\r\n\r\n")
        go_ahead = b""
        while b"\r\n\r\n" not in go_ahead:  # the client waits for it, as curl does
            go_ahead += sock.recv(1024)
        assert go_ahead.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert _responses(sock, 1) == [_expected(body)]


class _RecordingTransport(asyncio.Transport):
    """Only what the protocol calls, recorded: a unit test of the flow logic around the
    parser (the tests above run it on real sockets)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def _feed(connection: asyncio.BufferedProtocol, data: bytes) -> None:
    """As a transport does: ask for a buffer, fill what fits, report it."""
    while data:
        buffer = connection.get_buffer(-1)
        size = min(len(buffer), len(data))
        buffer[:size] = data[:size]
        connection.buffer_updated(size)
        data = data[size:]


async def _settle() -> None:
    for _ in range(20):  # let the app task run its steps
        await asyncio.sleep(0)


def test_a_body_is_read_only_once_the_app_asks_and_never_kept_after_an_early_answer() -> None:
    async def scenario() -> None:
        config = uvicorn.Config(_app, lifespan="off", log_level="error",
                                http=guarded_protocol(16 * 1024, 5.0, 5.0, MAX_BODY))
        config.load()
        connection = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=uvicorn.server.ServerState(), app_state={})
        assert isinstance(connection, asyncio.BufferedProtocol)
        transport = _RecordingTransport()
        connection.connection_made(transport)
        body = _bodies([BIG])[0]

        # Asked for: reading pauses after the head and resumes when the app reads.
        _feed(connection, _request(body)[: -len(body)])
        assert transport.paused
        await _settle()
        assert not transport.paused  # the app called receive()
        _feed(connection, body)
        await _settle()
        assert transport.written.endswith(_expected(body)[1])

        # Answered without reading it (as a request without a valid key is): the body is
        # read into the bounded head buffer and dropped, not kept in a body-sized one.
        transport.written = b""
        _feed(connection, _request(body, "/early")[: -len(body)])
        await _settle()
        assert transport.written.startswith(b"HTTP/1.1 401")
        assert not transport.paused
        assert len(connection.get_buffer(-1)) <= DIRECT_BODY_MIN_BYTES
        _feed(connection, body)
        _feed(connection, _request(b"after"))  # the next request is parsed as usual
        await _settle()
        assert transport.written.endswith(_expected(b"after")[1])

    asyncio.run(scenario())
