"""The native HTTPS front (Rust, ``ppml_serve._native.Front``) before the gateway's app.

The front owns the client connections, on the HTTPS port and on the gRPC one: TLS (rustls
on aws-lc-rs: TLS 1.3, or 1.2 with ECDHE and AEAD suites only), HTTP/1.1 and HTTP/2, the
exact head limit, head and body deadlines, the connection cap and the body size limit. It
runs on threads of its own in the gateway process, answers inference itself (the native
path: ``native_path.py``) and passes every other request to the app (or the gRPC service)
over Unix sockets in a private directory (mode 0700, so no other user can reach them around
the front's TLS and limits).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from ppml_serve import _native
from ppml_serve.errors import ConfigError
from ppml_serve.queue.redis_common import Keys
from ppml_serve.queue.redis_lane import Endpoint
from ppml_serve.settings import Settings

UPSTREAM_MARGIN_S = 10.0
"""The app answers 504 at its own deadlines; the front waits this much longer before it does."""
APP_KEEP_ALIVE_S = 60
"""The app keeps the front's pooled connections this long (the front reuses them for less)."""


class NativeFront:
    """Binds at construction (errors surface before serving), serves from ``start``."""

    def __init__(self, settings: Settings) -> None:
        gateway = settings.gateway
        secure = not gateway.plaintext_http
        ca_file = gateway.client_ca_file if secure else None
        if ca_file is not None and not ca_file.is_file():
            raise ConfigError(f"gateway.client_ca_file: no such file: {ca_file}")
        self._grace_s = float(gateway.shutdown_grace_s)
        self._directory = Path(tempfile.mkdtemp(prefix="ppml-gateway-"))  # 0700, ours
        self.upstream = self._directory / "app.sock"
        # the gRPC port too: the Python gRPC service behind it on a socket of its own
        self.grpc_upstream = (self._directory / "grpc.sock"
                              if gateway.grpc_port is not None else None)
        try:
            self._front = _native.Front(
                host=gateway.host, port=gateway.port, upstream=str(self.upstream),
                cert_file=str(settings.server_cert_file) if secure else None,
                key_file=str(settings.server_key_file) if secure else None,
                client_ca_file=str(ca_file) if ca_file is not None else None,
                reuse_port=gateway.processes > 1,
                max_header_bytes=gateway.max_header_bytes,
                header_timeout_s=gateway.header_timeout_s,
                keep_alive_s=float(gateway.keep_alive_s),
                body_timeout_s=gateway.body_timeout_s,
                max_request_bytes=gateway.max_request_bytes,
                max_connections=gateway.max_connections,
                max_inflight=gateway.max_inflight,
                upstream_timeout_s=max(gateway.request_timeout_s, gateway.repository_timeout_s,
                                       gateway.job_timeout_s) + UPSTREAM_MARGIN_S,
                threads=gateway.front_threads, grpc_port=gateway.grpc_port,
                grpc_upstream=str(self.grpc_upstream) if self.grpc_upstream else None)
        except BaseException:
            self._remove_directory()
            raise

    @property
    def port(self) -> int:
        return self._front.port

    @property
    def grpc_port(self) -> int | None:
        return self._front.grpc_port

    def stats(self) -> dict[str, int]:
        return self._front.stats()

    @property
    def native(self) -> _native.Front:
        return self._front

    def install_plane(self, settings: Settings) -> None:
        """Let the front answer inference (``gateway/native_path.py`` keeps it in step)."""
        gateway = settings.gateway
        endpoint = Endpoint.parse(settings.redis_url(), settings.ca_file)
        spool = settings.redis.payload_spool
        layout = Keys(settings.redis.prefix)
        self._front.install_plane(
            cluster=settings.redis.cluster, unix_path=endpoint.path, host=endpoint.host,
            port=endpoint.port, tls=endpoint.tls,
            ca_file=str(endpoint.ca_file) if endpoint.tls and endpoint.ca_file else None,
            username=endpoint.username, password=endpoint.password, db=endpoint.db,
            command_timeout_s=settings.redis.command_timeout_s,
            request_timeout_s=gateway.request_timeout_s,
            max_inflight_per_model=gateway.max_inflight_per_model,
            max_rows=settings.worker.max_rows_per_request,
            spool=str(spool) if spool is not None else None,
            spool_min_bytes=settings.redis.payload_spool_min_bytes,
            announced_key=layout.models, requested_key=layout.repository,
            job_timeout_s=gateway.job_timeout_s, job_ttl_s=gateway.job_ttl_s,
            max_request_bytes=gateway.max_request_bytes)

    def _remove_directory(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)

    def start(self) -> None:
        self._front.start()

    async def stop(self) -> None:
        """Stop accepting; requests in flight get the shutdown grace to be answered (again:
        harmless)."""
        await asyncio.to_thread(self._front.stop, self._grace_s)
        self._remove_directory()


class FrontedServer(uvicorn.Server):
    """uvicorn on the front's private socket: on shutdown the front stops accepting first
    and lets its requests in flight be answered, then the app stops."""

    def __init__(self, config: uvicorn.Config, front: NativeFront) -> None:
        super().__init__(config)
        self.front = front

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)  # the app's socket is open: clients may come
        if self.should_exit:  # the app failed to start
            await self.front.stop()
        else:
            self.front.start()

    async def shutdown(self, sockets: Any = None) -> None:
        await self.front.stop()
        await super().shutdown(sockets)
