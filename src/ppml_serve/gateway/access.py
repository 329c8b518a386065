"""The access log's lines, one writer for each protocol: the app's HTTP requests and the
native front's alike, the Python gRPC service's calls and the front's ``ModelInfer`` alike."""

from __future__ import annotations

import logging

from ppml_serve.gateway.errors import grpc_name

access = logging.getLogger("ppml_serve.access")


def access_line(method: str, path: str, key_name: str, model: str, version: str, status: int,
                seconds: float, received: str, sent: str, client: str,
                caller_id: str) -> None:
    """An HTTP request's line."""
    version = version if version == "-" or (version.isdigit() and len(version) < 10) \
        else "_other"
    access.info("%s %s key=%s model=%s version=%s status=%d ms=%.1f in=%s out=%s client=%s",
                method, path if model != "_other" else "(unknown model)",
                key_name, model, version, status, seconds * 1000, received, sent,
                client or "-",
                extra={"key": key_name, "model": model, "version": version,
                       "client": client or "-",
                       "status": status,
                       "ms": round(seconds * 1000, 1),
                       "bytes_in": int(received) if received.isdigit() else 0,
                       "bytes_out": int(sent) if sent.isdigit() else 0,
                       **({"caller_request_id": caller_id} if caller_id else {})})


def grpc_access_line(rpc: str, key_name: str, model: str, version: str, code: str,
                     seconds: float, received: int, sent: int) -> None:
    """A gRPC call's line (``code``: the status code's name)."""
    ms = round(seconds * 1000, 1)
    access.info("gRPC %s key=%s model=%s version=%s status=%s ms=%.1f in=%d out=%d",
                rpc, key_name, model, version, code, ms, received, sent,
                extra={"key": key_name, "model": model, "version": version,
                       "status": code, "ms": ms, "bytes_in": received, "bytes_out": sent})


def native_grpc_line(rpc: str, key_name: str, model: str, version: str, http_status: int,
                     seconds: float, received: int, sent: int) -> None:
    """A call the native front answered, whose status it reports as the HTTP one."""
    grpc_access_line(rpc, key_name, model, version, grpc_name(http_status), seconds,
                     received, sent)
