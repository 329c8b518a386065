"""A lean closed-loop HTTP/1.1 load generator (asyncio streams, prebuilt requests).

It parses only what it must (status line, Content-Length), so that on a 2-core machine the
load generator takes as little CPU as possible from the service it measures.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


async def run_load(url: str, request: bytes, items_per_request: int, concurrency: int,
                   duration_s: float, warmup_s: float, ssl_context: ssl.SSLContext | None,
                   on_progress: Callable[[float], None] | None = None) -> LoadResult:
    """``concurrency`` connections, each sending the next request as soon as one returns."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if ssl_context else 80)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        try:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                writer.write(request)
                status = await _read_response(reader)
                done = time.perf_counter()
                if sent >= measure_from and done <= stop_at:
                    if status == 200:
                        latencies.append((done - sent) * 1000)
                    else:
                        errors += 1
        finally:
            writer.close()

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                on_progress(min(1.0, (time.perf_counter() - start) / (warmup_s + duration_s)))

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(connection() for _ in range(concurrency)))
    finally:
        ticker.cancel()
    return LoadResult(concurrency, duration_s, len(latencies), len(latencies) * items_per_request,
                      errors, latencies, closed_loop=True)
