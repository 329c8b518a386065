"""The ASGI app: thin KServe v2 routes over ``DataPlane``; errors become ``{"error": ...}``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ppml_serve import __version__
from ppml_serve.build_info import register_process_metrics
from ppml_serve.errors import (
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PPMLError,
    Unauthorized,
    UnsupportedEncoding,
)
from ppml_serve.gateway.access import access, access_line, native_grpc_line
from ppml_serve.gateway.api_docs import docs_routes
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.gateway.dataplane import DataPlane
from ppml_serve.gateway.errors import (
    LOG_SETTINGS_UNSUPPORTED,
    SHARED_MEMORY_UNSUPPORTED,
    TRACE_SETTINGS_UNSUPPORTED,
    status_of,
)
from ppml_serve.gateway.native_path import Answered, NativePath
from ppml_serve.gateway.openapi import openapi_document
from ppml_serve.gateway.stats import InferenceStatistics
from ppml_serve.logs import request_id
from ppml_serve.queue.contract import QueueStats, queue_name, split_queue_name
from ppml_serve.tracing import annotate, record_native_spans, span, tracing_on

log = logging.getLogger("ppml_serve.gateway")
admin = logging.getLogger("ppml_serve.audit")

FRONT_CLIENT = "x-ppml-client"
"""Set by the native front the same way: the client's address."""


def _served_model(request: Request) -> str | None:
    """The route's model name if it is served here (names from URLs are not echoed into logs
    or spans unchecked): ``None`` for routes without one, ``_other`` for unknown names."""
    model = request.path_params.get("model")
    known = getattr(request.app.state, "served", None)
    if model is None or known is None or known(model):
        return model
    return "_other"


def _annotate_span(request: Request, response: Response) -> None:
    """OpenTelemetry's HTTP attributes on the request's server span, and which model and
    version answered (names of served models only). Nothing while tracing is off."""
    if not tracing_on():
        return
    model = _served_model(request)
    served = model not in (None, "_other")
    sent = response.headers.get("content-length", "")
    received = request.headers.get("content-length", "")
    annotate(http__request__method=request.method,
             http__route=getattr(request.scope.get("route"), "path", None),
             http__response__status_code=response.status_code,
             http__request__body__size=int(received) if received.isdigit() else None,
             http__response__body__size=int(sent) if sent.isdigit() else None,
             ppml__model=model if served else None,
             ppml__model_version=getattr(request.state, "version", None) if served else None)


def _client(request: Request) -> str:
    """The caller's address, in the front's words (the app's own peer is the front)."""
    return request.headers.get(FRONT_CLIENT, "")[:64]


def error_response(exc: PPMLError) -> JSONResponse:
    status = status_of(exc).http
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, NotReady):
        headers["Retry-After"] = "1"
    if status == 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
            30)


_FRONT_COUNTERS = {
    "connections": "Client connections accepted by the native front",
    "refused_connections": "Connections refused at gateway.max_connections (503)",
    "requests": "Requests the native front passed on or answered",
    "slow_bodies": "Request bodies cut off at gateway.body_timeout_s (408)",
    "oversized_bodies": "Request bodies refused over gateway.max_request_bytes (413)",
    "overloaded": "Inference requests refused at gateway.max_inflight (429)",
    "upstream_failures": "Requests the app behind the front could not answer (503/504)",
    "native_answers": "Inference requests the front answered itself (the native path), "
                      "errors included",
}


class _FrontCollector(Collector):
    """``ppml_front_*_total``: the native front's own counts, read when scraped."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(f"ppml_front_{name}", text)
                for name, text in _FRONT_COUNTERS.items()]

    def collect(self) -> list[CounterMetricFamily]:
        values = self._stats()
        return [CounterMetricFamily(f"ppml_front_{name}", text, value=values.get(name, 0))
                for name, text in _FRONT_COUNTERS.items()]


_MODEL_VERSION = ["model", "version"]
"""The labels of every per-model series, gateway and worker alike (so that they join)."""


class Metrics:
    """The gateway's Prometheus metrics. Label values are bounded: model names only of served
    models (others are ``_other``), statuses are HTTP codes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_process_metrics(self.registry, "gateway")
        self.requests = Counter("ppml_requests", "Inference and job requests by model, version "
                                "and HTTP status, refused ones included ('_other' for names "
                                "that are not served)", ["model", "version", "status"],
                                registry=self.registry)
        self.latency = Histogram("ppml_request_seconds", "Latency at the gateway, by model and "
                                 "version", ["model", "version"], registry=self.registry,
                                 buckets=_SECONDS)
        self.queue_wait = Histogram("ppml_queue_wait_seconds", "Time from enqueue until the "
                                    "request's batch started in a worker", _MODEL_VERSION,
                                    registry=self.registry, buckets=_SECONDS)
        self.engine = Histogram("ppml_engine_seconds", "Engine time of the batch each answer "
                                "came from", _MODEL_VERSION, registry=self.registry,
                                buckets=_SECONDS)
        self.batch_size = Histogram("ppml_batch_size", "Size of the worker batch each answer "
                                    "came from", _MODEL_VERSION, registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.inflight = Gauge("ppml_inflight_requests", "Requests waiting for their answer "
                              "in this gateway", _MODEL_VERSION, registry=self.registry)
        self.queue_depth = Gauge("ppml_queue_depth", "Requests in the model's stream "
                                 "(waiting or being worked on)", _MODEL_VERSION,
                                 registry=self.registry)
        self.queue_lag = Gauge("ppml_queue_lag", "Requests no worker has taken yet (the "
                               "consumer group's lag)", _MODEL_VERSION, registry=self.registry)
        self.queue_pending = Gauge("ppml_queue_pending", "Requests taken by a worker, not yet "
                                   "answered", _MODEL_VERSION, registry=self.registry)
        self.live_workers = Gauge("ppml_live_workers", "Workers with a fresh heartbeat",
                                  _MODEL_VERSION, registry=self.registry)
        self.disk_free = Gauge("ppml_state_disk_free_bytes", "Free bytes on the volume of a "
                               "directory this gateway watches (below redis.min_free_disk_mb "
                               "it is not ready)", ["path"], registry=self.registry)
        self.statistics = InferenceStatistics()
        """The same events in Triton's statistics shape (``/v2/models/{m}/stats``)."""

    def observe_answer(self, queue: str, batch_size: int, queue_s: float,
                       engine_s: float) -> None:
        """A worker's answer for ``queue`` (the version's queue name): its batch's size, its
        wait in the queue and its engine time."""
        self.statistics.answer(queue, queue_s, engine_s, batch_size)
        labels = split_queue_name(queue)
        self.batch_size.labels(*labels).observe(batch_size)
        self.queue_wait.labels(*labels).observe(queue_s)
        self.engine.labels(*labels).observe(engine_s)

    def watch_front(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the native front's counters (read from it at each scrape)."""
        self.registry.register(_FrontCollector(stats))

    def set_disk_free(self, free: dict[str, int]) -> None:
        for path, value in free.items():
            self.disk_free.labels(path).set(value)

    def set_queue_state(self, inflight: dict[str, int], stats: dict[str, QueueStats]) -> None:
        for model, state in stats.items():  # by queue name
            labels = split_queue_name(model)
            self.inflight.labels(*labels).set(inflight.get(model, 0))
            self.queue_depth.labels(*labels).set(state.depth)
            self.queue_lag.labels(*labels).set(state.lag)
            self.queue_pending.labels(*labels).set(state.pending)
            self.live_workers.labels(*labels).set(state.live_workers)


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that drops its TLS connection mid-write is routine under load, not an error
    worth a traceback per connection."""
    error = context.get("exception")
    if isinstance(error, (ConnectionError, RuntimeError, ssl.SSLError)) and \
            "protocol" in str(context.get("message", "")).lower():
        log.debug("client connection dropped: %s", type(error).__name__)
        return
    loop.default_exception_handler(context)


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
             "deflate": zlib.MAX_WBITS}
"""zlib window bits per Content-Encoding (tritonclient's request compression)."""


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", *_DECODERS):
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:32]!r} is not supported "
                                  "(gzip, deflate or none)")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        if chunk:  # Starlette ends with an empty chunk; a lone body is then not copied
            chunks.append(chunk)
    body = b"".join(chunks)
    return body if encoding == "identity" else _decompressed(body, encoding, limit)


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body decoded, held to the same limit decoded as sent (no decompression bomb)."""
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        plain = decoder.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidInput(f"the request body is not valid {encoding} data") from None
    if len(plain) > limit or decoder.unconsumed_tail:
        raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit once decompressed")
    if not decoder.eof:
        raise InvalidInput(f"the request body ends inside its {encoding} data")
    return plain


_UNSUPPORTED = (
    (re.compile(r"/v2/(system|cuda)sharedmemory(/.*)?"), SHARED_MEMORY_UNSUPPORTED),
    (re.compile(r"/v2(/models/[^/]+(/versions/[^/]+)?)?/trace/setting"),
     TRACE_SETTINGS_UNSUPPORTED),
    (re.compile(r"/v2/logging"), LOG_SETTINGS_UNSUPPORTED),
)
"""Triton extensions that are not served: a 501 that says so, instead of a bare 404."""


def _unsupported(path: str) -> str | None:
    return next((why for pattern, why in _UNSUPPORTED if pattern.fullmatch(path)), None)


_ASKED_VERSION = re.compile(r"/v2/models/[^/]+/versions/([^/]+)/infer")
"""The version an inference path names (as sent, escapes kept)."""
_CALLER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
"""A caller's X-Request-ID that is kept (echoed, logged): a short, plain token."""


def _log_access(request: Request, response: Response, key_name: str, seconds: float,
                caller_id: str = "", client: str = "") -> None:
    """One line per API call: who, what, outcome, how long, how big; never a payload."""
    model = _served_model(request) or "-"
    # the version that answered (an unversioned request's newest ready one), else the asked
    version = getattr(request.state, "version", None) or request.path_params.get("version",
                                                                                   "-")
    access_line(request.method, request.url.path, key_name, model, version,
                response.status_code, seconds, request.headers.get("content-length", "0"),
                response.headers.get("content-length", "0"), client, caller_id)


DEV_ATTESTATION = {
    "simulated": "simulated: NO hardware protection (development only)",
    "dcap-test": "dcap-test: DCAP quotes from a TEST PKI, verified for real; NO hardware "
                 "protection (development only)",
}


def create_app(dataplane: DataPlane, keys: ApiKeyStore, metrics: Metrics,
               native: NativePath | None, secure: bool = True, attestation: str = "simulated",
               access_log: bool = True, repository_timeout_s: float = 120.0,
               services: Sequence[Callable[[], AbstractAsyncContextManager[None]]] = ()
               ) -> Starlette:
    """Build the app: the control routes behind the native front, which answers inference
    itself (``native``: what keeps it in step and hands back what it answered, for the
    metrics, statistics and logs); ``dataplane`` and ``services`` (e.g. the gRPC server) are
    started and stopped with the app's lifespan. The app is reached only through the front
    (a private socket), so the headers the front sets can be trusted."""

    def model_label(model: str) -> str:
        # Names come from URLs: only served models get a label of their own (bounded).
        return model if dataplane.is_served(model) else "_other"

    def native_answered(answered: Answered) -> None:
        """A request the native front answered: counted, timed and logged as the app's own
        (a gRPC call as the gRPC service's: statistics and queue metrics, its own line)."""
        grpc = answered.path.startswith("gRPC ")
        if not grpc:
            shown = model_label(answered.model)
            labels = (shown, answered.version if shown != "_other" else "_other")
            metrics.requests.labels(*labels, str(answered.status)).inc()
            metrics.latency.labels(*labels).observe(answered.seconds)
        # as the app counts its own (not sealed; none for a caller refused for its key)
        if answered.queue and (grpc or answered.path.endswith("/infer")):
            metrics.statistics.outcome(answered.queue, answered.status == 200, answered.seconds)
        if answered.answer is not None:
            batch_size, queue_s, engine_s = answered.answer
            metrics.observe_answer(answered.queue, batch_size, queue_s, engine_s)
        if answered.trace is not None:
            trace_id, caller, spans = answered.trace
            served = model_label(answered.model) != "_other"
            # the server span is named "METHOD route", as the app names its own
            method, _, route = spans[0][0].partition(" ") if spans else ("POST", "", "")
            record_native_spans(trace_id, caller, spans, {} if grpc else {
                key: value for key, value in {
                    "http.request.method": method, "http.route": route,
                    "http.response.status_code": answered.status,
                    "http.request.body.size": answered.bytes_in or None,
                    "http.response.body.size": answered.bytes_out or None,
                    "ppml.model": answered.model if served else None,
                    "ppml.model_version": answered.version if served else None,
                }.items() if value is not None})
        token = request_id.set(answered.request_id)
        try:
            if answered.failure is not None:
                log.error("%s", answered.failure)
            if access_log and access.isEnabledFor(logging.INFO) and grpc:
                shown = model_label(answered.model)  # a refused caller's name: not echoed
                native_grpc_line(answered.path.removeprefix("gRPC "), answered.key_name,
                                 shown, answered.version if shown != "_other" else "_other",
                                 answered.status, answered.seconds, answered.bytes_in,
                                 answered.bytes_out)
            elif access_log and access.isEnabledFor(logging.INFO):
                method = "GET" if "/jobs/" in answered.path else "POST"  # a job's answer
                # refused before a version was chosen: the one asked, as the app logs it
                asked = _ASKED_VERSION.search(answered.path)
                version = answered.version if answered.queue else (
                    asked.group(1) if asked else "-")
                access_line(method, answered.path, answered.key_name,
                            model_label(answered.model), version, answered.status,
                            answered.seconds, str(answered.bytes_in), str(answered.bytes_out),
                            answered.client, answered.caller_id)
        finally:
            request_id.reset(token)

    if native is not None:
        native.on_answered = native_answered
        services = [*services, native.serve]

    def authenticated(model_route: bool = True, scope: str | None = None) -> Callable[
        [Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]
    ]:
        def wrap(handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                with span(f"{request.method} {request.scope['route'].path}"
                          if "route" in request.scope else request.method,
                          headers=request.headers, server=True):
                    return await handle(request)

            async def handle(request: Request) -> Response:
                # An id no caller can choose (a repeated one would mix two calls' log lines):
                # the caller's is kept beside it.
                rid = uuid.uuid4().hex
                caller_id = request.headers.get("x-request-id", "")
                caller_id = caller_id if _CALLER_ID.fullmatch(caller_id) else ""
                token = request_id.set(rid)
                started = time.perf_counter()
                key_name = "-"
                response: Response | None = None
                try:
                    principal = keys.authenticate(request.headers.get("authorization"))
                    key_name = principal.name
                    if model_route:
                        principal.authorize(request.path_params["model"])
                        request.state.version = await dataplane.resolve(
                            request.path_params["model"], request.path_params.get("version"))
                    if scope is not None:
                        principal.require(scope)
                    request.state.principal = principal.key_id
                    response = await handler(request)
                except PPMLError as exc:
                    response = error_response(exc)
                except ClientDisconnect:  # cut off (e.g. a body too slow): nobody to answer
                    response = Response(status_code=400)
                except Exception as exc:  # a bug, not the client's doing: no detail leaks
                    log.error("unexpected %s in %s %s", type(exc).__name__, request.method,
                              request.url.path)
                    response = JSONResponse({"error": "internal error"}, status_code=500)
                finally:
                    seconds = time.perf_counter() - started
                    if response is not None:
                        _annotate_span(request, response)
                    if access_log and response is not None and access.isEnabledFor(
                            logging.INFO):  # nothing to format when nobody listens
                        _log_access(request, response, key_name, seconds, caller_id,
                                    _client(request))
                    request_id.reset(token)
                response.headers["X-Request-ID"] = caller_id or rid
                return response
            return endpoint
        return wrap

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({
            "name": "ppml-serve", "version": __version__,
            "extensions": ["binary_tensor_data"],
            "security": {
                "payload_encryption": "AES-256-GCM" if secure else "OFF (insecure)",
                "worker_attestation": DEV_ATTESTATION.get(attestation, attestation),
                "end_to_end_sealing": "X25519-HKDF-SHA256-AES-256-GCM",
            },
        })

    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = await dataplane.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @authenticated()
    async def model_metadata(request: Request) -> Response:
        model, version = request.path_params["model"], request.state.version
        spec = await dataplane.spec(model, version)
        document = spec.as_json()
        document["versions"] = await dataplane.versions(model, version)
        return JSONResponse(document)

    @authenticated()
    async def model_config(request: Request) -> Response:
        return JSONResponse(await dataplane.model_config(request.path_params["model"],
                                                         request.state.version))

    @authenticated()
    async def model_stats(request: Request) -> Response:
        if native is not None:
            native.drain()
        model, version = request.path_params["model"], request.state.version
        return JSONResponse(metrics.statistics.as_json(queue_name(model, version)))

    @authenticated(model_route=False)
    async def all_stats(request: Request) -> Response:
        """Triton's statistics of every model version served (``get_inference_statistics()``
        without a model)."""
        if native is not None:
            native.drain()
        queues = set(await dataplane.models()) | metrics.statistics.queues()
        return JSONResponse({"model_stats": metrics.statistics.rows(queues)})

    @authenticated(model_route=False, scope="admin")
    async def repository_index(request: Request) -> Response:
        return JSONResponse(await dataplane.repository_index())

    def repository_change(action: str) -> Callable[[Request], Awaitable[Response]]:
        @authenticated(model_route=False, scope="admin")
        async def change(request: Request) -> Response:
            model = request.path_params["model"]
            body = await _read_body(request, 64 * 1024)
            if body.strip():
                try:
                    parameters = json.loads(body).get("parameters") or {}
                except (ValueError, AttributeError, RecursionError):
                    raise InvalidInput("the body must be a JSON object") from None
                if not isinstance(parameters, dict):
                    raise InvalidInput("'parameters' must be a JSON object")
                # tritonclient always sends unload_dependents; there are no ensembles here.
                if set(parameters) - {"unload_dependents"}:
                    raise InvalidInput(
                        "load and unload take no parameters here: model files and configs "
                        "come from the workers' repository (see 'ppml-serve model add')")
            try:
                await dataplane.change_model(model, action, repository_timeout_s)
            except PPMLError as exc:  # the audit log says what happened, not what was asked
                admin.warning("model %r: %s by key %s failed: %s", model[:64], action,
                              request.state.principal, exc)
                raise
            admin.info("model %r %sed by key %s", model, action, request.state.principal)
            return JSONResponse({})
        return change

    @authenticated()
    async def model_ready(request: Request) -> Response:
        model = request.path_params["model"]
        is_ready = await dataplane.model_ready(model, request.state.version)
        return JSONResponse({"name": model, "ready": is_ready},
                            status_code=200 if is_ready else 503)

    async def answered_by_the_front(request: Request) -> Response:
        """Inference is the native front's (``native_path.py``): it passes none of these on
        but a job's HEAD (not served); one that reaches the app anyway is told to retry, and
        the bug is logged."""
        if request.method == "HEAD":  # the GET route's twin: the front answers GET only
            return JSONResponse({"error": "method not allowed"}, status_code=405)
        log.error("the front passed %s %s on: inference is its own to answer",
                  request.method, request.url.path)
        return JSONResponse({"error": "the gateway is starting or stopping: retry"},
                            status_code=503, headers={"Retry-After": "1"})

    @authenticated()
    async def model_attestation(request: Request) -> Response:
        model = request.path_params["model"]
        return JSONResponse({"model": model, "workers": await dataplane.attestations(
            model, request.state.version)})

    @authenticated(model_route=False, scope="metrics")
    async def metrics_endpoint(request: Request) -> Response:
        if native is not None:
            native.drain()  # the front's answers so far, counted before they are shown
        metrics.set_disk_free(dataplane.disk_free())
        # With Redis down the gauges keep their last values; readiness tells the rest.
        with contextlib.suppress(NotReady):
            metrics.set_queue_state(dataplane.inflight(), await dataplane.queue_stats())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_exception_handler(_quiet_disconnects)
        await dataplane.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for service in services:
                    await stack.enter_async_context(service())
                yield
        finally:
            await dataplane.stop()

    async def not_found(request: Request, exc: Any) -> Response:
        unsupported = _unsupported(request.url.path)
        if unsupported is not None:
            return JSONResponse({"error": unsupported}, status_code=501)
        return JSONResponse({"error": "no such endpoint"}, status_code=404)

    async def method_not_allowed(request: Request, exc: Any) -> Response:
        return JSONResponse({"error": "method not allowed"}, status_code=405)

    routes = [  # the hot path first: routes are matched in order
        Route("/v2/models/{model}/infer", answered_by_the_front, methods=["POST"]),
        Route("/v2/models/stats", all_stats),
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/openapi.json", openapi),
        *docs_routes(),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/config", model_config),
        Route("/v2/models/{model}/stats", model_stats),
        Route("/v2/models/{model}/versions/{version}/config", model_config),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_change("load"),
              methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_change("unload"),
              methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/infer", answered_by_the_front,
              methods=["POST"]),
        Route("/v2/models/{model}/attestation", model_attestation),
        Route("/v2/models/{model}/jobs", answered_by_the_front, methods=["POST"]),
        Route("/v2/models/{model}/jobs/{job}", answered_by_the_front),
        Route("/v2/models/{model}/infer-sealed", answered_by_the_front, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: method_not_allowed})
    app.state.served = dataplane.is_served
    return app
