"""Lean closed-loop load generators with prebuilt requests: HTTP/1.1 (asyncio streams) and
gRPC (grpc.aio, the message serialised once and the answer left unparsed).

The HTTP one parses only what it must (status line, Content-Length), so that on a 2-core
machine the load generator takes as little CPU as possible from the service it measures.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    items: int
    errors: int
    latencies_ms: list[float] = field(repr=False)
    closed_loop: bool = False
    """Every connection sends its next request as soon as one returns (the load generator)."""
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    """CPU of each part of the service per request, when the service runs here."""
    gpu_utilization: float | None = None
    """Mean GPU utilisation (percent) during the run, on a GPU."""

    @property
    def window_throughput(self) -> float:
        """Items completed inside the window over its length."""
        return self.items / self.duration_s if self.duration_s else 0.0

    @property
    def throughput(self) -> float:
        """Items per second. For a closed loop, by the response-time law X = N / R (N
        connections, R mean response time): unlike counting completions in a window, it is
        not quantised by batches that complete together (16 answers at once every 300 ms
        would make a 10 s window count in steps of 1.6 items/s)."""
        if not self.closed_loop or not self.latencies_ms or not self.requests:
            return self.window_throughput
        mean_s = sum(self.latencies_ms) / len(self.latencies_ms) / 1000
        return self.concurrency * (self.items / self.requests) / mean_s

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def build_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             "Connection: keep-alive"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _closed_loop(call: Callable[[Any], Awaitable[bool]], open_: Callable[[], Awaitable[Any]],
                       close: Callable[[Any], Awaitable[None]], items_per_request: int,
                       concurrency: int, duration_s: float, warmup_s: float,
                       on_progress: Callable[[float], None] | None) -> LoadResult:
    """``concurrency`` loops, each on a connection of its own (``open_``), calling again as
    soon as an answer returns; ``call`` says whether the answer was a success."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def loop() -> None:
        nonlocal errors
        connection = await open_()
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                ok = await call(connection)
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    if ok:
                        latencies.append((done - sent) * 1000)
                    else:
                        errors += 1
        finally:
            await close(connection)

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                on_progress(min(1.0, (time.perf_counter() - start) / (warmup_s + duration_s)))

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        ticker.cancel()
    return LoadResult(concurrency, duration_s, len(latencies), len(latencies) * items_per_request,
                      errors, latencies, closed_loop=True)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def grpc_request(model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """A serialised ``ModelInferRequest`` of ``inputs`` (raw contents, as tritonclient sends)."""
    from tritonclient.grpc import service_pb2 as pb

    from ppml_serve.codecs.tensors import datatype_name, tensor_bytes

    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_name(array.dtype),
                           shape=list(array.shape))
        request.raw_input_contents.append(bytes(tensor_bytes(array)))
    return bytes(request.SerializeToString())


async def run_grpc_load(address: str, message: bytes, api_key: str, items_per_request: int,
                        concurrency: int, duration_s: float, warmup_s: float,
                        ca_pem: bytes | None,
                        on_progress: Callable[[float], None] | None = None) -> LoadResult:
    """Closed-loop ``ModelInfer`` calls of ``message``: one channel (connection) per loop."""
    import grpc

    metadata = (("authorization", f"Bearer {api_key}"),)

    async def open_() -> Any:
        channel = (grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca_pem))
                   if ca_pem is not None else grpc.aio.insecure_channel(address))
        # bytes in, bytes out: no (de)serialisation on the load generator's CPU
        return channel, channel.unary_unary(MODEL_INFER)

    async def call(connection: Any) -> bool:
        try:
            await connection[1](message, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(connection: Any) -> None:
        await connection[0].close()

    return await _closed_loop(call, open_, close, items_per_request, concurrency, duration_s,
                              warmup_s, on_progress)


async def run_load(url: str, request: bytes, items_per_request: int, concurrency: int,
                   duration_s: float, warmup_s: float, ssl_context: ssl.SSLContext | None,
                   on_progress: Callable[[float], None] | None = None) -> LoadResult:
    """``concurrency`` connections, each sending the next request as soon as one returns."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if ssl_context else 80)

    async def open_() -> Any:
        return await asyncio.open_connection(host, port, ssl=ssl_context)

    async def call(connection: Any) -> bool:
        reader, writer = connection
        writer.write(request)
        return await _read_response(reader) == 200

    async def close(connection: Any) -> None:
        connection[1].close()

    return await _closed_loop(call, open_, close, items_per_request, concurrency, duration_s,
                              warmup_s, on_progress)
