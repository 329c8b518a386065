"""Assemble and run a gateway process: settings -> broker, sealer, keys -> app -> uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import uvicorn

from ppml_serve.audit_chain import attach
from ppml_serve.crypto.keys import make_sealer
from ppml_serve.disk import DiskWatch
from ppml_serve.gateway.app import Metrics, create_app
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.gateway.dataplane import DataPlane
from ppml_serve.gateway.front import APP_KEEP_ALIVE_S, FrontedServer, NativeFront
from ppml_serve.gateway.native_path import NativePath
from ppml_serve.guarded_http import guarded_protocol
from ppml_serve.queue.redis_common import Keys, connect_async
from ppml_serve.queue.redis_gateway import RedisGatewayBroker
from ppml_serve.queue.spool import PayloadSpool
from ppml_serve.settings import Settings
from ppml_serve.tracing import tracing_on

log = logging.getLogger("ppml_serve.gateway")


def _grpc_service(settings: Settings, dataplane: DataPlane, keys: ApiKeyStore,
                  metrics: Metrics, behind: Path, before_statistics: Callable[[], None]
                  ) -> Callable[[], AbstractAsyncContextManager[None]]:
    """The gRPC service of the calls the front passes on (all but inference), run beside
    the app on the same event loop, on the private socket ``behind`` (the front holds the
    gRPC port's TLS and limits)."""
    from ppml_serve.gateway.grpc_service import InferenceServicer, build_grpc_server

    gateway = settings.gateway

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        servicer = InferenceServicer(dataplane, keys, settings.log.access_log,
                                     gateway.repository_timeout_s, metrics.statistics,
                                     before_statistics)
        server = build_grpc_server(servicer, behind, gateway.max_request_bytes)
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


def build_gateway(settings: Settings) -> uvicorn.Server:
    """Everything is checked here, before the port opens, so errors surface at start."""
    keys = ApiKeyStore.load(settings.api_keys_file)
    sealer = make_sealer(settings)
    attach(settings.audit_log("gateway"), "gateway")
    gateway = settings.gateway
    client = connect_async(settings.redis_url(), settings.ca_file,
                           max_connections=gateway.redis_connections,
                           pool_timeout_s=gateway.redis_wait_s, cluster=settings.redis.cluster,
                           socket_timeout=settings.redis.command_timeout_s)
    spool_dir = settings.redis.payload_spool
    layout = Keys(settings.redis.prefix)
    broker = RedisGatewayBroker(client, layout)
    metrics = Metrics()
    dataplane = DataPlane(broker, sealer, settings.gateway,
                          worker_max_age_s=settings.worker.dead_after_s,
                          configured_models=set(settings.models),
                          max_rows=settings.worker.max_rows_per_request,
                          disk=DiskWatch([settings.state_dir, *filter(None, [spool_dir])],
                                         settings.redis.min_free_disk_mb << 20))
    # the front answers inference itself (TLS, limits, keys, admission, queue, answers);
    # the app and the gRPC service behind it hold the control routes and keep it in step
    front = NativeFront(settings)
    front.install_plane(settings)
    ratio = settings.tracing.sample_ratio
    native = NativePath(front.native, dataplane, keys, sealer, layout,
                        f"{uuid.uuid4().hex}n",
                        tracing=lambda: ratio if tracing_on() else None)
    dataplane.attach_native(front.native)
    services = []
    if front.grpc_upstream is not None:
        services.append(_grpc_service(settings, dataplane, keys, metrics, front.grpc_upstream,
                                      native.drain))
    if spool_dir is not None:
        # past its deadline a request is never read again, only dropped; the margin covers
        # clocks of processes on one host and a worker's reclaim delay
        services.append(_spool_sweeper(PayloadSpool(spool_dir), gateway.request_timeout_s
                                       + settings.worker.dead_after_s + 60))
    app = create_app(dataplane, keys, metrics, native,
                     secure=settings.security.encrypt_payloads,
                     attestation=settings.security.attestation,
                     access_log=settings.log.access_log,
                     repository_timeout_s=settings.gateway.repository_timeout_s,
                     services=services)
    metrics.watch_front(front.stats)
    # behind the front: its private socket, no TLS, and the front caps connections
    return FrontedServer(uvicorn.Config(
        app, uds=str(front.upstream), timeout_keep_alive=APP_KEEP_ALIVE_S, loop="uvloop",
        log_level="warning", access_log=False, lifespan="on",
        http=guarded_protocol(gateway.max_header_bytes, gateway.header_timeout_s,
                              gateway.body_timeout_s, gateway.max_request_bytes),
        timeout_graceful_shutdown=gateway.shutdown_grace_s, proxy_headers=False,
        server_header=False, date_header=False), front)
