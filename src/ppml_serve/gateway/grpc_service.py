"""The KServe v2 gRPC service (``inference.GRPCInferenceService``) over the same data plane.

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
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from ppml_serve import __version__
from ppml_serve.codecs.tensors import (
    BYTES,
    check_bytes_count,
    check_shape,
    datatype_name,
    deserialize_bytes,
    numpy_dtype,
    serialize_bytes,
    tensor_bytes,
)
from ppml_serve.codecs.v2 import InferRequest, classify
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

# Typed contents field of InferTensorContents for each v2 datatype.
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             BYTES: "bytes_contents"}

Response = TypeVar("Response")
_answered_version: ContextVar[str] = ContextVar("answered_version", default="-")
"""The version that answered the call being handled (for its access line)."""
Context = grpc.aio.ServicerContext[Any, Any]


def _status(error: PPMLError) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(error).grpc]


def _decode_inputs(request: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Input tensors from raw contents (the binary form) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry per input")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for position, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        if not tensor.name or tensor.name in inputs:
            raise InvalidInput(f"inputs[{position}]: a unique, non-empty name is required")
        dtype = numpy_dtype(tensor.datatype, where)
        shape = check_shape(tuple(int(d) for d in tensor.shape), where)
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if tensor.datatype == BYTES:
            check_bytes_count(count, where)
        if raw and tensor.datatype == BYTES:
            array = deserialize_bytes(raw[position], shape, where)
        elif raw:
            if len(raw[position]) != count * dtype.itemsize:
                raise InvalidInput(f"{where}: raw contents hold {len(raw[position])} bytes, "
                                   f"shape {list(shape)} needs {count * dtype.itemsize}")
            array = np.frombuffer(raw[position], dtype=dtype)
        else:
            field = _CONTENTS.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else ()
            if len(values) != count:
                raise InvalidInput(f"{where}: contents hold {len(values)} values, shape "
                                   f"{list(shape)} needs {count}")
            try:
                if tensor.datatype == BYTES:
                    array = np.empty(count, dtype=object)
                    array[:] = list(values)
                else:
                    array = np.asarray(values, dtype=dtype)
            except (ValueError, OverflowError):
                raise InvalidInput(f"{where}: contents cannot be read as "
                                   f"{tensor.datatype}") from None
        inputs[tensor.name] = array.reshape(shape)
    if not inputs:
        raise InvalidInput("inputs must be a non-empty list")
    return inputs


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
        answered = _answered_version.set("-")
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
                version = _answered_version.get() if shown != "_other" else "_other"
                grpc_access_line(rpc, key_name, shown, version, code.name,
                                 time.perf_counter() - started,
                                 request.ByteSize() if request is not None else 0,
                                 response.ByteSize() if response is not None else 0)
            _answered_version.reset(answered)
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

    async def _infer(self, request: Any) -> Any:
        """One ModelInferRequest answered (shared by ModelInfer and ModelStreamInfer)."""
        wanted = {output.name: True for output in request.outputs} or None
        classification = {}
        for output in request.outputs:
            if "classification" in output.parameters:
                count = output.parameters["classification"].int64_param
                if count < 1:
                    raise InvalidInput(f"output {output.name!r}: parameters.classification must "
                                       "be a positive integer (the number of classes)")
                classification[output.name] = count
        decoded = InferRequest(request.id or None, _decode_inputs(request), wanted, True,
                               classification=classification)
        version = await self._dataplane.resolve(request.model_name,
                                                request.model_version or None)
        _answered_version.set(version)
        started = time.perf_counter()
        queue = queue_name(request.model_name, version)
        try:
            outputs = await self._dataplane.infer_decoded(request.model_name, version, decoded)
        except PPMLError:
            self._statistics.outcome(queue, False, time.perf_counter() - started)
            raise
        self._statistics.outcome(queue, True, time.perf_counter() - started)
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=version, id=request.id)
        for name, array in outputs.items():
            if name in classification:
                classes = classify(np.asarray(array), classification[name],
                                   self._dataplane.labels(queue), name)
                response.outputs.add(name=name, datatype="BYTES", shape=list(classes.shape))
                response.raw_output_contents.append(serialize_bytes(classes))
                continue
            response.outputs.add(name=name, datatype=datatype_name(array.dtype),
                                 shape=list(array.shape))
            response.raw_output_contents.append(bytes(tensor_bytes(array)))
        return response

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        return await self._call(context, "ModelInfer", request.model_name,
                                lambda: self._infer(request), request=request)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Context
                               ) -> AsyncIterator[Any]:
        """tritonclient's ``start_stream``: a bidirectional stream of ordinary requests,
        answered in order; a request's error is its response's ``error_message`` and the
        stream goes on. The key is checked for every request (a revoked key stops at once)."""
        header = dict(context.invocation_metadata() or ()).get("authorization")
        header = header if isinstance(header, str) else None
        async for request in requests:
            token = request_id.set(uuid.uuid4().hex)
            try:
                if request is _MALFORMED:
                    raise InvalidInput("the request is not a valid ModelInferRequest message "
                                       "(KServe v2 / Open Inference Protocol gRPC)")
                principal = self._keys.authenticate(header)
                principal.authorize(request.model_name)
                with span("gRPC ModelStreamInfer", server=True):
                    answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except PPMLError as exc:
                answer = pb.ModelStreamInferResponse(error_message=str(exc))
            except Exception as exc:  # a bug, not the client's doing: no detail leaks
                log.error("unexpected %s in gRPC ModelStreamInfer", type(exc).__name__)
                answer = pb.ModelStreamInferResponse(error_message="internal error")
            finally:
                request_id.reset(token)
            yield answer


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


def build_grpc_server(servicer: InferenceServicer, host: str, port: int,
                      cert_file: Path | None, key_file: Path | None,
                      client_ca_file: Path | None, max_message_bytes: int,
                      shared_port: bool = False, unix_socket: Path | None = None
                      ) -> grpc.aio.Server:
    """A grpc.aio server on the running loop: TLS when a certificate is given (mutual TLS
    when a client CA is), messages up to ``max_message_bytes``; ``shared_port``: other
    gateway processes listen on the same port (else a port in use is an error);
    ``unix_socket``: on that private socket instead, behind the native front."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if shared_port else 0),
    ])
    server.add_generic_rpc_handlers((_service_handlers(servicer), _UnknownMethods()))
    if unix_socket is not None:
        server.add_insecure_port(f"unix:{unix_socket}")
        return server
    address = f"{host}:{port}"
    if cert_file is None or key_file is None:
        server.add_insecure_port(address)
        return server
    credentials = grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=client_ca_file.read_bytes() if client_ca_file else None,
        require_client_auth=client_ca_file is not None)
    server.add_secure_port(address, credentials)
    return server
