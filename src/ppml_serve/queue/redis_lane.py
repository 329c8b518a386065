"""A lean connection to one Redis for a worker's per-batch commands.

redis-py spends ~100 µs of Python on each command (pool, retry, response callbacks,
observability hooks), and every batch costs two of them: a worker's XREADGROUP and the
script that posts answers. A lane is one connection whose commands are packed and parsed by
hiredis (the C parser redis-py itself uses): ~20 µs a command. ``BlockingRedisLane`` serves
threads, one command at a time. (The gateway's requests are the native front's, over the
redis crate.) ``Endpoint`` reads a Redis URL for both.

It speaks to a single Redis (a Cluster keeps redis-py's routing) and does not retry: a lost
or silent connection fails every command in flight with redis-py's own ``ConnectionError``
or ``TimeoutError`` (callers already turn those into 503), and the next command reconnects.
A blocking command holds the connection until it returns: give each blocking reader a lane
of its own.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import redis
from pydantic import SecretStr
from redis.asyncio.connection import parse_url

from ppml_serve.crypto.tls import client_context

Arg = str | bytes | int | float


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, from a redis-py URL (``redis://``, ``rediss://``,
    ``unix://``; user, password, db)."""

    host: str
    port: int
    path: str | None
    db: int
    tls: bool
    ca_file: Path | None
    username: str | None = field(repr=False)
    password: str | None = field(repr=False)

    @classmethod
    def parse(cls, url: SecretStr, ca_file: Path | None) -> Endpoint:
        text = url.get_secret_value()
        options = parse_url(text)
        return cls(str(options.get("host", "localhost")), int(options.get("port", 6379)),
                   options.get("path"), int(options.get("db") or 0),
                   text.startswith("rediss://"), ca_file, options.get("username"),
                   options.get("password"))

    def __str__(self) -> str:
        return f"{self.path or f'{self.host}:{self.port}'} db {self.db}"

    def tls_context(self) -> ssl.SSLContext | None:
        return client_context(self.ca_file) if self.tls else None

    def handshake(self) -> list[tuple[Arg, ...]]:
        """Commands that make a new connection this user's, on this database."""
        commands: list[tuple[Arg, ...]] = []
        if self.password:
            commands.append(("AUTH", self.username, self.password) if self.username
                            else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis.pyi types the argument as a one-element tuple; any length is accepted
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class BlockingRedisLane:
    """One connection for threads: a command at a time (a lock orders callers), opened on
    first use and reopened after a loss. Errors are redis-py's."""

    def __init__(self, url: SecretStr, ca_file: Path | None, timeout_s: float = 5.0) -> None:
        self._endpoint = Endpoint.parse(url, ca_file)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._reader = hiredis.Reader(replyError=redis.ResponseError)
        self._socket_timeout = 0.0

    def __repr__(self) -> str:
        return f"BlockingRedisLane({self._endpoint})"

    def call(self, *args: Arg, block_s: float = 0.0) -> Any:
        """Send one command and return its reply; a blocking command passes how long."""
        with self._lock:
            try:
                if self._socket is None:
                    self._connect()
                reply = self._round_trip(args, self._timeout_s + block_s)
            except (OSError, hiredis.ProtocolError) as exc:
                self._drop()
                if isinstance(exc, TimeoutError):
                    raise redis.TimeoutError("Redis did not answer in time") from None
                raise redis.ConnectionError(
                    f"no connection to Redis at {self._endpoint} ({type(exc).__name__})"
                ) from None
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> None:
        endpoint = self._endpoint
        sock: socket.socket
        if endpoint.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:  # resolves the name and tries each address; closes what failed
            sock = socket.create_connection((endpoint.host, endpoint.port), self._timeout_s)
        try:
            sock.settimeout(self._timeout_s)
            if endpoint.path is not None:
                sock.connect(endpoint.path)
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                context = endpoint.tls_context()
                if context is not None:
                    sock = context.wrap_socket(sock, server_hostname=endpoint.host)
        except BaseException:
            sock.close()
            raise
        self._socket, self._socket_timeout = sock, self._timeout_s
        self._reader = hiredis.Reader(replyError=redis.ResponseError)
        for command in endpoint.handshake():
            reply = self._round_trip(command, self._timeout_s)
            if isinstance(reply, redis.ResponseError):
                self._drop()
                raise reply

    def _round_trip(self, args: tuple[Arg, ...], timeout_s: float) -> Any:
        sock = self._socket
        if sock is None:
            raise ConnectionError("not connected")
        if timeout_s != self._socket_timeout:
            sock.settimeout(timeout_s)
            self._socket_timeout = timeout_s
        sock.sendall(_pack(args))
        while (reply := self._reader.gets()) is False:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            self._reader.feed(data)
        return reply

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
