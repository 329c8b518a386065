"""Run benchmark configurations: raw engine and full pipeline, in one process, one run."""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppml_serve.bench.load import LoadResult, build_request, run_load
from ppml_serve.bench.raw import run_raw
from ppml_serve.client.http import encode_inputs
from ppml_serve.crypto.tls import client_context
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import LocalStack
from ppml_serve.settings import load_settings
from ppml_serve.state import read_api_key


@dataclass(frozen=True)
class BenchConfig:
    """One thing to measure: a model file on an engine, secure or plain."""

    name: str
    model: str
    model_path: Path
    engine: str = "onnxruntime"
    precision: str = "fp32"
    secure: bool = True


@dataclass(frozen=True)
class BenchOptions:
    concurrencies: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    items_per_request: int = 1
    workers: int = 1
    max_batch_size: int = 16
    max_batch_delay_ms: float = 2.0
    threads: int = 0


def _entry(config: BenchConfig, mode: str, result: LoadResult, **extra: Any) -> dict[str, Any]:
    return {
        "name": config.name, "engine": config.engine, "precision": config.precision,
        "secure": config.secure, "mode": mode, "concurrency": result.concurrency,
        "throughput": round(result.throughput, 2), "p50_ms": round(result.percentile(50), 3),
        "p95_ms": round(result.percentile(95), 3), "p99_ms": round(result.percentile(99), 3),
        "errors": result.errors, "requests": result.requests, **extra,
    }


def sample_inputs(engine_inputs: Any, items: int) -> dict[str, np.ndarray[Any, Any]]:
    """Random inputs of the model's declared shapes (dynamic dims: batch=items, others=1)."""
    from ppml_serve.codecs.tensors import numpy_dtype

    rng = np.random.default_rng(0)
    arrays = {}
    for spec in engine_inputs:
        shape = [items if i == 0 and d == -1 else (1 if d == -1 else d)
                 for i, d in enumerate(spec.shape)]
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind in "ui":
            arrays[spec.name] = rng.integers(0, 255, size=shape).astype(dtype)
        else:
            arrays[spec.name] = rng.random(size=shape).astype(dtype)
    return arrays


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def run_config(config: BenchConfig, options: BenchOptions,
               step: Callable[[str], None]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    engine = load_engine(config.model, config.model_path.read_bytes(), config.engine,
                         options.threads)
    inputs = sample_inputs(engine.spec.inputs, options.items_per_request)
    for batch_size in sorted({1, options.max_batch_size}):
        step(f"{config.name}: raw engine, batch {batch_size}")
        result = run_raw(engine, inputs, batch_size, options.duration_s, options.warmup_s)
        runs.append(_entry(config, "raw", result, batch_size=batch_size))
    del engine
    with tempfile.TemporaryDirectory(prefix="ppml-bench-") as state:
        settings = load_settings(
            state_dir=Path(state),
            models={config.model: config.model_path},
            gateway={"port": 0, "plaintext_http": not config.secure, "max_queue_length": 100_000},
            redis={"allow_plaintext": not config.secure},
            security={"encrypt_payloads": config.secure},
            worker={"max_batch_size": options.max_batch_size,
                    "max_batch_delay_ms": options.max_batch_delay_ms,
                    "engine_threads": options.threads},
        )
        stack = LocalStack(settings, options.workers, log_level="WARNING")
        try:
            stack.start()
            body, headers = encode_inputs(inputs)
            headers["Authorization"] = f"Bearer {read_api_key(settings.state_dir)}"
            request = build_request(stack.url, f"/v2/models/{config.model}/infer", body, headers)
            context = client_context(settings.ca_file) if config.secure else None
            for concurrency in options.concurrencies:
                step(f"{config.name}: pipeline, concurrency {concurrency}")
                result = asyncio.run(run_load(stack.url, request, options.items_per_request,
                                              concurrency, options.duration_s,
                                              options.warmup_s, context))
                runs.append(_entry(config, "pipeline", result,
                                   batch_size=options.items_per_request))
        finally:
            stack.stop()
    return runs


def run_benchmark(configs: list[BenchConfig], options: BenchOptions,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for config in configs:
        runs.extend(run_config(config, options, progress or (lambda _: None)))
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[str]:
    """Human-readable ratios: best pipeline vs best raw, secure vs plain, per name."""
    lines = []
    best: dict[tuple[str, str], float] = {}
    for run in runs:
        key = (run["name"], run["mode"])
        best[key] = max(best.get(key, 0.0), run["throughput"])
    for (name, mode), value in best.items():
        if mode == "pipeline" and (name, "raw") in best and best[(name, "raw")]:
            lines.append(f"{name}: pipeline/raw = {value / best[(name, 'raw')]:.2f} "
                         f"({value:.1f} vs {best[(name, 'raw')]:.1f} items/s)")
    return lines
