"""The raw engine alone: same model, precision and threads as the worker, no server."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ppml_serve.bench.load import LoadResult
from ppml_serve.engines.base import Engine


def run_raw(engine: Engine, inputs: dict[str, np.ndarray[Any, Any]], batch_size: int,
            duration_s: float, warmup_s: float, parallel: int = 1) -> LoadResult:
    """Back-to-back engine calls on batches of ``batch_size`` from ``parallel`` threads (as
    many as the worker keeps in flight); latency is per call."""
    batch = {name: np.repeat(array[:1], batch_size, axis=0) for name, array in inputs.items()}
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    def loop() -> None:
        while (now := time.perf_counter()) < stop_at:
            engine.infer(batch)
            if now >= measure_from:
                latencies.append((time.perf_counter() - now) * 1000)

    threads = [threading.Thread(target=loop) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - measure_from
    return LoadResult(1, elapsed, len(latencies), len(latencies) * batch_size, 0, latencies)
