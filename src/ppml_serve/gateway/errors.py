"""What each error means to a caller: one table for the HTTP and the gRPC front ends."""

from __future__ import annotations

from typing import NamedTuple

from ppml_serve.errors import (
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PPMLError,
    Unauthorized,
    UnsupportedEncoding,
)


class Status(NamedTuple):
    http: int
    grpc: str
    """Name of the ``grpc.StatusCode``."""


_STATUSES: tuple[tuple[type[PPMLError], Status], ...] = (
    (InvalidInput, Status(400, "INVALID_ARGUMENT")),
    (Unauthorized, Status(401, "UNAUTHENTICATED")),
    (Forbidden, Status(403, "PERMISSION_DENIED")),
    (ModelNotFound, Status(404, "NOT_FOUND")),
    (PayloadTooLarge, Status(413, "RESOURCE_EXHAUSTED")),
    (UnsupportedEncoding, Status(415, "INVALID_ARGUMENT")),
    (Overloaded, Status(429, "RESOURCE_EXHAUSTED")),
    (NotReady, Status(503, "UNAVAILABLE")),
    (DeadlineExceeded, Status(504, "DEADLINE_EXCEEDED")),
)
INTERNAL = Status(500, "INTERNAL")


def status_of(error: PPMLError) -> Status:
    return next((status for kind, status in _STATUSES if isinstance(error, kind)), INTERNAL)


def grpc_name(http: int) -> str:
    """The gRPC status code's name for an HTTP status of the table (the native front
    reports its gRPC answers' statuses as HTTP ones)."""
    if http == 200:
        return "OK"
    return next((status.grpc for _, status in _STATUSES if status.http == http),
                INTERNAL.grpc)


SHARED_MEMORY_UNSUPPORTED = (
    "shared memory is not supported by ppml-serve: tensors travel inside each request (JSON "
    "or the binary extension) and are sealed on the way; memory shared with the server would "
    "bypass the envelope")
TRACE_SETTINGS_UNSUPPORTED = (
    "changing trace settings over the API is not supported by ppml-serve: tracing is "
    "configured in the settings (tracing.*) and exported over OTLP")
LOG_SETTINGS_UNSUPPORTED = (
    "changing log settings over the API is not supported by ppml-serve: logging is "
    "configured in the settings (log.*) or with --log-level")
"""Triton extensions that are not served, in the words both fronts answer with (HTTP 501,
gRPC UNIMPLEMENTED)."""
