"""The raw engine alone: same model, precision and threads as the worker, no server."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ppml_serve.bench.load import LoadResult
from ppml_serve.engines.base import Engine


def run_raw(engine: Engine, inputs: dict[str, np.ndarray[Any, Any]], batch_size: int,
            duration_s: float, warmup_s: float) -> LoadResult:
    """Back-to-back engine calls on batches of ``batch_size``; latency is per call."""
    batch = {name: np.repeat(array[:1], batch_size, axis=0) for name, array in inputs.items()}
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        engine.infer(batch)
    latencies = []
    start = time.perf_counter()
    stop_at = start + duration_s
    while (now := time.perf_counter()) < stop_at:
        engine.infer(batch)
        latencies.append((time.perf_counter() - now) * 1000)
    elapsed = time.perf_counter() - start
    return LoadResult(batch_size, elapsed, len(latencies), len(latencies) * batch_size, 0,
                      latencies)
