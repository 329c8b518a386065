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
