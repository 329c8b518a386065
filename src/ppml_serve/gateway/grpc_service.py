"""The KServe v2 gRPC service (``inference.GRPCInferenceService``) behind the native front:
every RPC but inference (``ModelInfer`` and ``ModelStreamInfer`` are the front's own).

The message classes and the service descriptor come from ``tritonclient[grpc]``, whose
``inference`` package is the KServe v2 protocol (plus Triton's extensions, answered
UNIMPLEMENTED here), so tritonclient's and KServe's gRPC clients work unchanged. Same API keys
(metadata ``authorization: Bearer …``), same limits, errors mapped to gRPC status codes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from ppml_serve import __version__
from ppml_serve.errors import InvalidInput, PPMLError
from ppml_serve.gateway.access import access, grpc_access_line
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.gateway.dataplane import DataPlane
from ppml_serve.gateway.errors import (
    LOG_SETTINGS_UNSUPPORTED,
    SHARED_MEMORY_UNSUPPORTED,
    TRACE_SETTINGS_UNSUPPORTED,
    status_of,
)
from ppml_serve.gateway.stats import InferenceStatistics
from ppml_serve.logs import request_id
from ppml_serve.queue.contract import queue_name
from ppml_serve.tracing import span

log = logging.getLogger("ppml_serve.gateway")

Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]


def _status(error: PPMLError) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error).grpc]


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The v2 RPCs over ``DataPlane``; Triton-only RPCs (shared memory, trace and log settings)
    stay UNIMPLEMENTED."""

    def __init__(self, dataplane: DataPlane, keys: ApiKeyStore, access_log: bool = True,
                 repository_timeout_s: float = 120.0,
                 statistics: InferenceStatistics | None = None,
                 before_statistics: Callable[[], None] | None = None) -> None:
        """``before_statistics``: brings in what the native front answered (read first)."""
        self._dataplane = dataplane
        self._before_statistics = before_statistics
        self._statistics = statistics or InferenceStatistics()
        self._keys = keys
        self._access_log = access_log
        self._repository_timeout_s = repository_timeout_s

    async def _call(self, context: Context, rpc: str, model: str | None,
                    handler: Callable[[], Awaitable[Response]],
                    scope: str | None = None, request: Any = None) -> Response:
        """Authenticate (model RPCs, and those that need ``scope``), run, map errors to
        status codes, log one access line (with ``request``'s size and the answer's)."""
        metadata = dict(context.invocation_metadata() or ())
        with span(f"gRPC {rpc}", headers=metadata, server=True):
            return await self._handle(context, rpc, model, handler, metadata, scope, request)

    async def _handle(self, context: Context, rpc: str, model: str | None,
                      handler: Callable[[], Awaitable[Response]],
                      metadata: dict[str, Any], scope: str | None = None,
                      request: Any = None) -> Response:
        token = request_id.set(uuid.uuid4().hex)
        started = time.perf_counter()
        key_name, code = "-", grpc.StatusCode.OK
        response: Any = None
        try:
            if model is not None or scope is not None:
                header = metadata.get("authorization")
                principal = self._keys.authenticate(header if isinstance(header, str) else None)
                key_name = principal.name
                if scope is not None:
                    principal.require(scope)
                else:
                    principal.authorize(str(model))
            result = await handler()
            response = result
            return result
        except PPMLError as exc:
            code = _status(exc)
            await context.abort(code, str(exc))
            raise  # abort raises; this line is never reached
        except Exception as exc:  # a bug, not the client's doing: no detail leaks
            code = grpc.StatusCode.INTERNAL
            log.error("unexpected %s in gRPC %s", type(exc).__name__, rpc)
            await context.abort(code, "internal error")
            raise
        finally:
            if self._access_log and model is not None and access.isEnabledFor(logging.INFO):
                shown = model if self._dataplane.is_served(model) else "_other"
                version = "-" if shown != "_other" else "_other"
                grpc_access_line(rpc, key_name, shown, version, code.name,
                                 time.perf_counter() - started,
                                 request.ByteSize() if request is not None else 0,
                                 response.ByteSize() if response is not None else 0)
            request_id.reset(token)

    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=await self._dataplane.ready())

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        return pb.ServerMetadataResponse(name="ppml-serve", version=__version__,
                                         extensions=["binary_tensor_data"])

    async def ModelReady(self, request: Any, context: Context) -> Any:
        async def ready() -> Any:
            version = await self._dataplane.resolve(request.name, request.version or None)
            return pb.ModelReadyResponse(
                ready=await self._dataplane.model_ready(request.name, version))
        return await self._call(context, "ModelReady", request.name, ready)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        async def metadata() -> Any:
            version = await self._dataplane.resolve(request.name, request.version or None)
            spec = await self._dataplane.spec(request.name, version)
            described = pb.ModelMetadataResponse
            return described(
                name=spec.name, versions=await self._dataplane.versions(request.name, version),
                platform=spec.platform,
                inputs=[described.TensorMetadata(name=t.name, datatype=t.datatype,
                                                 shape=list(t.shape)) for t in spec.inputs],
                outputs=[described.TensorMetadata(name=t.name, datatype=t.datatype,
                                                  shape=list(t.shape)) for t in spec.outputs])
        return await self._call(context, "ModelMetadata", request.name, metadata)

    async def ModelConfig(self, request: Any, context: Context) -> Any:
        async def config() -> Any:
            version = await self._dataplane.resolve(request.name, request.version or None)
            document = await self._dataplane.model_config(request.name, version)
            return pb.ModelConfigResponse(config=json_format.ParseDict(
                document, model_config_pb2.ModelConfig(), ignore_unknown_fields=True))
        return await self._call(context, "ModelConfig", request.name, config)

    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        """One model's statistics (its newest ready version, or the one named), or every
        model's when no name is given, as HTTP's ``/v2/models/stats`` answers."""
        async def statistics() -> Any:
            if self._before_statistics is not None:
                self._before_statistics()
            if request.name:
                version = await self._dataplane.resolve(request.name, request.version or None)
                queues = {queue_name(request.name, version)}
            else:
                queues = set(await self._dataplane.models()) | self._statistics.queues()
            return json_format.ParseDict({"model_stats": self._statistics.rows(queues)},
                                         pb.ModelStatisticsResponse(),
                                         ignore_unknown_fields=True)
        if request.name:
            return await self._call(context, "ModelStatistics", request.name, statistics)
        return await self._call(context, "ModelStatistics", None, statistics, scope="infer")

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        async def index() -> Any:
            listed = pb.RepositoryIndexResponse
            return listed(models=[listed.ModelIndex(**row)
                                  for row in await self._dataplane.repository_index()])
        return await self._call(context, "RepositoryIndex", None, index, scope="admin")

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        return await self._change(context, "load", request.model_name, request.parameters,
                                  pb.RepositoryModelLoadResponse)

    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        return await self._change(context, "unload", request.model_name, request.parameters,
                                  pb.RepositoryModelUnloadResponse)

    async def _change(self, context: Context, action: str, model: str, parameters: Any,
                      answer: Callable[[], Any]) -> Any:
        async def change() -> Any:
            if set(parameters) - {"unload_dependents"}:
                raise InvalidInput("load and unload take no parameters here: model files and "
                                   "configs come from the workers' repository (see "
                                   "'ppml-serve model add')")
            await self._dataplane.change_model(model, action, self._repository_timeout_s)
            return answer()
        return await self._call(context, f"Repository {action}", None, change, scope="admin")

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        return await _front_only(context, "ModelInfer")

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Context
                               ) -> AsyncIterator[Any]:
        await _front_only(context, "ModelStreamInfer")
        yield pb.ModelStreamInferResponse()  # never reached: abort raises


async def _front_only(context: Context, rpc: str) -> None:
    """Inference is the native front's: it passes none on but a message it could not
    decode (refused by ``_refusing_malformed`` before this); one that reaches here anyway
    is told to retry, and the bug is logged."""
    log.error("the front passed gRPC %s on: inference is its own to answer", rpc)
    await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is starting or stopping: "
                        "retry")


SERVICE = "inference.GRPCInferenceService"
_MALFORMED = object()
"""Stands for a request whose bytes are not the method's message."""


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that never raises: grpc would log a traceback per malformed call (which
    any caller, keyless, can send) and answer INTERNAL; the handler answers instead."""
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _MALFORMED
    return deserialize


def _refusing_malformed(method: Callable[[Any, Context], Awaitable[Any]], message: str
                        ) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        if request is _MALFORMED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {message} message "
                                "(KServe v2 / Open Inference Protocol gRPC)")
        return await method(request, context)
    return handle


def _service_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The KServe v2 methods this gateway implements, each refusing malformed requests with
    INVALID_ARGUMENT in our words (methods it does not implement fall through to
    ``_UnknownMethods``)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        implemented = getattr(type(servicer), method.name, None)
        inherited = getattr(service_pb2_grpc.GRPCInferenceServiceServicer, method.name, None)
        if implemented is None or implemented is inherited or method.client_streaming:
            continue
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(getattr(servicer, method.name), method.input_type.name),
            request_deserializer=_lenient(request_type.FromString),
            response_serializer=response_type.SerializeToString)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=_lenient(pb.ModelInferRequest.FromString),
        response_serializer=pb.ModelStreamInferResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class _UnknownMethods(grpc.GenericRpcHandler):
    """Any other method: UNIMPLEMENTED, saying what is served (no traceback, no class name)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method = str(details.method)
        name = method.removeprefix(f"/{SERVICE}/")  # Triton's own methods get their reason
        reason = (SHARED_MEMORY_UNSUPPORTED if name.startswith(("SystemSharedMemory",
                                                                "CudaSharedMemory"))
                  else TRACE_SETTINGS_UNSUPPORTED if name == "TraceSetting"
                  else LOG_SETTINGS_UNSUPPORTED if name == "LogSettings" else None)

        async def refuse(request: Any, context: Context) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, reason or (
                f"no method {method[:200]!r} here: this server implements {SERVICE} "
                "(KServe v2) without shared memory, trace or log settings"))
        return grpc.unary_unary_rpc_method_handler(refuse)


def build_grpc_server(servicer: InferenceServicer, unix_socket: Path,
                      max_message_bytes: int) -> grpc.aio.Server:
    """A grpc.aio server on the running loop, on the private socket the native front
    passes calls to (it holds the gRPC port's TLS and limits), messages up to
    ``max_message_bytes``."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    server.add_generic_rpc_handlers((_service_handlers(servicer), _UnknownMethods()))
    server.add_insecure_port(f"unix:{unix_socket}")
    return server
