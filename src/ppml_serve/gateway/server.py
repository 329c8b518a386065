"""Assemble and run a gateway process: settings -> broker, sealer, keys -> app -> uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import uvicorn

from ppml_serve.audit_chain import attach
from ppml_serve.crypto.keys import make_sealer
from ppml_serve.crypto.tls import SERVER_CIPHERS
from ppml_serve.disk import DiskWatch
from ppml_serve.errors import ConfigError
from ppml_serve.gateway.app import Metrics, create_app
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.gateway.dataplane import DataPlane
from ppml_serve.gateway.front import APP_KEEP_ALIVE_S, FrontedServer, NativeFront
from ppml_serve.gateway.native_path import NativePath
from ppml_serve.guarded_http import guarded_protocol
from ppml_serve.queue.redis_common import Keys, connect_async
from ppml_serve.queue.redis_gateway import RedisGatewayBroker
from ppml_serve.queue.redis_lane import RedisLane
from ppml_serve.queue.spool import PayloadSpool
from ppml_serve.settings import Settings
from ppml_serve.tracing import native_spans_ready, tracing_on

log = logging.getLogger("ppml_serve.gateway")


def _mutual_tls(settings: Settings) -> dict[str, Any]:
    ca_file = settings.gateway.client_ca_file
    if ca_file is None or settings.gateway.plaintext_http:
        return {}
    if not ca_file.is_file():
        raise ConfigError(f"gateway.client_ca_file: no such file: {ca_file}")
    return {"ssl_ca_certs": str(ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}


def _grpc_service(settings: Settings, dataplane: DataPlane, keys: ApiKeyStore,
                  metrics: Metrics, behind: Path | None,
                  before_statistics: Callable[[], None] | None
                  ) -> Callable[[], AbstractAsyncContextManager[None]]:
    """The gRPC server, run beside the HTTPS one on the same event loop: on the gRPC port,
    or behind the native front on the private socket ``behind`` (the front holds the port's
    TLS and limits, and answers ``ModelInfer`` itself when it can)."""
    from ppml_serve.gateway.grpc_service import InferenceServicer, build_grpc_server

    gateway = settings.gateway
    secure = not gateway.plaintext_http and behind is None

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        servicer = InferenceServicer(dataplane, keys, settings.log.access_log,
                                     gateway.repository_timeout_s, metrics.statistics,
                                     before_statistics)
        if behind is not None:
            server = build_grpc_server(servicer, "unix", 0, None, None, None,
                                       gateway.max_request_bytes, unix_socket=behind)
        else:
            server = build_grpc_server(
                servicer, gateway.host, gateway.grpc_port or 0,
                settings.server_cert_file if secure else None,
                settings.server_key_file if secure else None,
                gateway.client_ca_file if secure else None, gateway.max_request_bytes,
                shared_port=gateway.processes > 1)
        await server.start()
        try:
            yield
        finally:
            await server.stop(grace=gateway.shutdown_grace_s)

    return serve


def _spool_sweeper(spool: PayloadSpool, older_than_s: float
                   ) -> Callable[[], AbstractAsyncContextManager[None]]:
    """Removes spooled payloads nobody will read (see ``queue/spool.py``), every minute."""

    async def sweep_forever() -> None:
        while True:
            try:
                removed = await asyncio.to_thread(spool.sweep, older_than_s)
            except OSError as exc:
                log.warning("sweeping the payload spool failed (%s)", exc.strerror)
            else:
                if removed:
                    log.info("removed %d stale payload(s) from the spool", removed)
            await asyncio.sleep(60)

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        task = asyncio.create_task(sweep_forever(), name="spool-sweeper")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return serve


def listening_sockets(settings: Settings) -> list[socket.socket] | None:
    """With several gateway processes, each binds the HTTPS port with SO_REUSEPORT (only
    processes of the same user can join it); with one, uvicorn binds it alone. The native
    front binds the port itself (the same way)."""
    gateway = settings.gateway
    if gateway.processes == 1 or gateway.front == "native":
        return None
    family = socket.getaddrinfo(gateway.host, gateway.port, type=socket.SOCK_STREAM)[0][0]
    try:
        return [socket.create_server((gateway.host, gateway.port), family=family,
                                     backlog=2048, reuse_port=True)]
    except OSError as exc:
        raise ConfigError(f"gateway.port: cannot listen on {gateway.host}:{gateway.port} "
                          f"({exc.strerror})") from None


def build_gateway(settings: Settings) -> uvicorn.Server:
    """Everything is checked here, before the port opens, so errors surface at start."""
    keys = ApiKeyStore.load(settings.api_keys_file)
    sealer = make_sealer(settings)
    attach(settings.audit_log("gateway"), "gateway")
    url = settings.redis_url()
    ca_file = settings.ca_file
    gateway = settings.gateway
    cluster = settings.redis.cluster
    deadline = settings.redis.command_timeout_s
    client = connect_async(url, ca_file, max_connections=gateway.redis_connections,
                           pool_timeout_s=gateway.redis_wait_s, cluster=cluster,
                           socket_timeout=deadline)
    reader = connect_async(url, ca_file, cluster=cluster)
    spool_dir = settings.redis.payload_spool
    spool = PayloadSpool.configured(spool_dir)
    # a Cluster routes each key to its node: only redis-py's client knows how
    lanes = None if cluster else functools.partial(RedisLane, url, ca_file, deadline)
    gateway_id = uuid.uuid4().hex
    broker = RedisGatewayBroker(client, reader, Keys(settings.redis.prefix), gateway_id,
                                spool, settings.redis.payload_spool_min_bytes, lanes)
    metrics = Metrics()
    dataplane = DataPlane(broker, sealer, settings.gateway,
                          worker_max_age_s=settings.worker.dead_after_s,
                          on_reply=metrics.observe_reply,
                          configured_models=set(settings.models),
                          max_rows=settings.worker.max_rows_per_request,
                          disk=DiskWatch([settings.state_dir, *filter(None, [spool_dir])],
                                         settings.redis.min_free_disk_mb << 20))
    services = []
    front = NativeFront(settings) if gateway.front == "native" else None
    native = None
    if front is not None and front.install_plane(settings):
        # its reply streams are its own (a reader each): the app's readers never see them
        ratio = settings.tracing.sample_ratio
        # traced requests too, where the spans it times can be recorded with its ids
        native = NativePath(front.native, dataplane, keys, sealer, Keys(settings.redis.prefix),
                            f"{gateway_id}n",
                            enabled=lambda: not tracing_on() or native_spans_ready(),
                            tracing=lambda: ratio if tracing_on() else None)
        dataplane.attach_native(front.native)
    if gateway.grpc_port is not None:
        services.append(_grpc_service(settings, dataplane, keys, metrics,
                                      front.grpc_upstream if front is not None else None,
                                      native.drain if native is not None else None))
    if spool is not None:
        # past its deadline a request is never read again, only dropped; the margin covers
        # clocks of processes on one host and a worker's reclaim delay
        services.append(_spool_sweeper(spool, gateway.request_timeout_s
                                       + settings.worker.dead_after_s + 60))
    app = create_app(dataplane, keys, settings.gateway.max_request_bytes, metrics,
                     secure=settings.security.encrypt_payloads,
                     attestation=settings.security.attestation,
                     access_log=settings.log.access_log,
                     repository_timeout_s=settings.gateway.repository_timeout_s,
                     services=services, behind_front=gateway.front == "native",
                     native=native)
    common: dict[str, Any] = {
        "loop": "uvloop", "log_level": "warning", "access_log": False, "lifespan": "on",
        "http": guarded_protocol(gateway.max_header_bytes, gateway.header_timeout_s,
                                 gateway.body_timeout_s, gateway.max_request_bytes),
        "timeout_graceful_shutdown": gateway.shutdown_grace_s,
        "proxy_headers": False, "server_header": False, "date_header": False}
    if front is not None:
        metrics.watch_front(front.stats)
        # behind the front: its private socket, no TLS, and the front caps connections
        return FrontedServer(uvicorn.Config(app, uds=str(front.upstream),
                                            timeout_keep_alive=APP_KEEP_ALIVE_S, **common),
                             front)
    secure_http = not settings.gateway.plaintext_http
    config = uvicorn.Config(app, host=settings.gateway.host, port=settings.gateway.port,
                            timeout_keep_alive=gateway.keep_alive_s,
                            limit_concurrency=gateway.max_connections,
                            ssl_certfile=str(settings.server_cert_file) if secure_http else None,
                            ssl_keyfile=str(settings.server_key_file) if secure_http else None,
                            ssl_ciphers=SERVER_CIPHERS, **common, **_mutual_tls(settings))
    return uvicorn.Server(config)
