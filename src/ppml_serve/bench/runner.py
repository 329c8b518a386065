"""Run benchmark configurations: raw engine and full pipeline, in one process, one run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppml_serve.bench.cpu import part_pids, per_request_ms, snapshot
from ppml_serve.bench.gpu import GpuSampler, cores_per_1000_rps
from ppml_serve.bench.load import (
    LoadResult,
    build_request,
    grpc_request,
    run_grpc_load,
    run_load,
)
from ppml_serve.bench.raw import run_raw
from ppml_serve.client.http import encode_inputs
from ppml_serve.crypto.tls import client_context
from ppml_serve.engines import load_engine
from ppml_serve.engines.providers import parse_device
from ppml_serve.local_stack import LocalStack
from ppml_serve.settings import load_settings
from ppml_serve.state import read_api_key


def is_int8(path: Path) -> bool:
    """A QDQ-quantized model (``model quantize``) carries QuantizeLinear nodes."""
    return b"QuantizeLinear" in path.read_bytes()


@dataclass(frozen=True)
class BenchConfig:
    """One thing to measure: a model file on an engine, secure or plain."""

    name: str
    model: str
    model_path: Path
    engine: str = "onnxruntime"
    precision: str = "fp32"
    """Compute precision asked of the engine for float models (fp32 or bf16)."""
    secure: bool = True
    persistence: str = "aof"
    """Of the managed Redis: ``aof`` (the default) or ``none`` (to measure what AOF costs)."""
    local_socket: bool = True
    """Reach the co-located Redis over a Unix socket (the default) or TLS on loopback."""

    @property
    def reported_precision(self) -> str:
        return "int8" if is_int8(self.model_path) else self.precision


@dataclass(frozen=True)
class BenchOptions:
    concurrencies: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    items_per_request: int = 1
    workers: int = 1
    gateways: int = 1
    """Gateway processes sharing the port (``gateway.processes``)."""
    max_batch_size: int = 16
    max_batch_delay_ms: float = 2.0
    threads: int = 0
    streams: int = 1
    repeats: int = 3
    device: str = "cpu"
    """Where ONNX Runtime runs (``cuda[:N]``: raw engine and pipeline on the GPU)."""
    protocol: str = "http"
    """How the load reaches the service: ``http`` (REST, binary extension) or ``grpc``
    (ModelInfer with raw contents)."""


def _entry(config: BenchConfig, mode: str, result: LoadResult, **extra: Any) -> dict[str, Any]:
    return {
        "name": config.name, "engine": config.engine, "precision": config.reported_precision,
        "secure": config.secure, "mode": mode, "concurrency": result.concurrency,
        "throughput": round(result.throughput, 2),
        "window_throughput": round(result.window_throughput, 2),
        "p50_ms": round(result.percentile(50), 3),
        "p95_ms": round(result.percentile(95), 3), "p99_ms": round(result.percentile(99), 3),
        "errors": result.errors, "requests": result.requests,
        **({"cpu_ms_per_request": result.cpu_ms_per_request,
            "cores_per_1000_rps": cores_per_1000_rps(result.cpu_ms_per_request)}
           if result.cpu_ms_per_request else {}),
        **({"gpu_utilization": result.gpu_utilization}
           if result.gpu_utilization is not None else {}),
        **extra,
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


def _stack(config: BenchConfig, options: BenchOptions, state: Path) -> LocalStack:
    settings = load_settings(
        state_dir=state,
        models={config.model: config.model_path},
        gateway={"port": 0, "plaintext_http": not config.secure, "max_queue_length": 100_000,
                 "processes": options.gateways},
        redis={"allow_plaintext": not config.secure, "persistence": config.persistence,
               "local_socket": config.local_socket},
        security={"encrypt_payloads": config.secure},
        worker={"max_batch_size": options.max_batch_size,
                "max_batch_delay_ms": options.max_batch_delay_ms,
                "engine_threads": options.threads, "engine": config.engine,
                "precision": config.precision, "streams": options.streams,
                "device": options.device},
    )
    return LocalStack(settings, options.workers, log_level="WARNING")


def _request_to(url: str, model: str, body: bytes, headers: dict[str, str],
                api_key: str) -> bytes:
    return build_request(url, f"/v2/models/{model}/infer", body,
                         {**headers, "Authorization": f"Bearer {api_key}"})


def _load(config: BenchConfig, stack: LocalStack, options: BenchOptions,
          inputs: dict[str, np.ndarray[Any, Any]], body: bytes, headers: dict[str, str],
          api_key: str) -> Callable[[int], Coroutine[Any, Any, LoadResult]]:
    """The closed-loop load on ``stack`` at a concurrency, by ``options.protocol``."""
    if options.protocol == "grpc":
        message = grpc_request(config.model, inputs)
        ca_pem = stack.settings.ca_file.read_bytes() if config.secure else None
        return lambda concurrency: run_grpc_load(
            stack.grpc_address, message, api_key, options.items_per_request, concurrency,
            options.duration_s, options.warmup_s, ca_pem)
    request = _request_to(stack.url, config.model, body, headers, api_key)
    context = client_context(stack.settings.ca_file) if config.secure else None
    return lambda concurrency: run_load(stack.url, request, options.items_per_request,
                                        concurrency, options.duration_s, options.warmup_s,
                                        context)


def _median_entry(config: BenchConfig, mode: str, results: list[LoadResult],
                  **extra: Any) -> dict[str, Any]:
    """The median run by throughput, with every repeat's throughput alongside."""
    ordered = sorted(results, key=lambda result: result.throughput)
    entry = _entry(config, mode, ordered[len(ordered) // 2], **extra)
    entry["throughput_repeats"] = [round(result.throughput, 2) for result in results]
    return entry


@dataclass(frozen=True)
class ExternalService:
    """A service that is already running (``bench --url``)."""

    url: str
    api_key: str = field(repr=False)
    ca_file: Path | None


def run_external(service: ExternalService, config: BenchConfig, options: BenchOptions,
                 step: Callable[[str], None]) -> list[dict[str, Any]]:
    """Pipeline runs against ``service``, interleaved with the raw engine run here."""
    engine = load_engine(config.model, config.model_path.read_bytes(), config.engine,
                         options.threads, config.precision, options.streams,
                         device=options.device)
    inputs = sample_inputs(engine.spec.inputs, options.items_per_request)
    body, headers = encode_inputs(inputs)
    request = _request_to(service.url, config.model, body, headers, service.api_key)
    context = client_context(service.ca_file) if service.url.startswith("https") else None
    raw: list[LoadResult] = []
    piped: dict[int, list[LoadResult]] = {}
    for repeat in range(options.repeats):
        step(f"{config.model}: raw engine, batch {options.max_batch_size} ({repeat + 1})")
        raw.append(run_raw(engine, inputs, options.max_batch_size, options.duration_s,
                           options.warmup_s, options.streams))
        for concurrency in options.concurrencies:
            step(f"{config.name}: {service.url}, concurrency {concurrency} ({repeat + 1})")
            piped.setdefault(concurrency, []).append(asyncio.run(run_load(
                service.url, request, options.items_per_request, concurrency,
                options.duration_s, options.warmup_s, context)))
    runs = [_median_entry(config, "raw", raw, batch_size=options.max_batch_size)]
    runs.extend(_median_entry(config, "pipeline", results, url=service.url,
                              batch_size=options.items_per_request)
                for results in piped.values())
    return runs


def run_group(configs: list[BenchConfig], options: BenchOptions,
              step: Callable[[str], None]) -> list[dict[str, Any]]:
    """Configs of one model, engine and precision (secure and/or plain), measured
    interleaved: each repeat runs the raw engine, then every pipeline, so that drift of a
    shared machine hits all of them alike. The stacks stay up (idle) between turns."""
    first = configs[0]
    engine = load_engine(first.model, first.model_path.read_bytes(), first.engine,
                         options.threads, first.precision, options.streams,
                         device=options.device)
    inputs = sample_inputs(engine.spec.inputs, options.items_per_request)
    body, headers = encode_inputs(inputs)
    raw: dict[int, list[LoadResult]] = {}
    piped: dict[tuple[int, int], list[LoadResult]] = {}
    with contextlib.ExitStack() as cleanup:
        stacks = []
        for config in configs:
            state = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ppml-bench-")))
            stack = _stack(config, options, state)
            cleanup.callback(stack.stop)
            step(f"{config.name}: starting the service")
            stack.start()
            stacks.append((config, stack, _load(config, stack, options, inputs, body, headers,
                                                read_api_key(state))))
        for repeat in range(options.repeats):
            for batch_size in sorted({1, options.max_batch_size}):
                step(f"{first.model}: raw engine, batch {batch_size} ({repeat + 1})")
                parallel = 1 if batch_size == 1 else options.streams
                raw.setdefault(batch_size, []).append(run_raw(
                    engine, inputs, batch_size, options.duration_s, options.warmup_s, parallel))
            for index, (config, stack, load) in enumerate(stacks):
                for concurrency in options.concurrencies:
                    step(f"{config.name}: pipeline, concurrency {concurrency} ({repeat + 1})")
                    pids = part_pids(stack)
                    before = snapshot(pids)
                    gpu = GpuSampler(parse_device(options.device)[1]).start() \
                        if options.device != "cpu" else None
                    result = asyncio.run(load(concurrency))
                    result.gpu_utilization = gpu.stop() if gpu is not None else None
                    # over warm-up and window alike: requests = rate x whole run
                    done = (result.throughput / options.items_per_request
                            * (options.duration_s + options.warmup_s))
                    result.cpu_ms_per_request = per_request_ms(before, snapshot(pids), done)
                    piped.setdefault((index, concurrency), []).append(result)
    runs: list[dict[str, Any]] = []
    for index, config in enumerate(configs):
        for batch_size, results in sorted(raw.items()):
            runs.append(_median_entry(config, "raw", results, batch_size=batch_size))
        for concurrency in options.concurrencies:
            runs.append(_median_entry(config, "pipeline", piped[(index, concurrency)],
                                      batch_size=options.items_per_request,
                                      protocol=options.protocol))
    return runs


def run_benchmark(configs: list[BenchConfig], options: BenchOptions,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str], list[BenchConfig]] = {}
    for config in configs:
        key = (config.model, str(config.model_path), config.engine, config.precision)
        groups.setdefault(key, []).append(config)
    runs: list[dict[str, Any]] = []
    for group in groups.values():
        runs.extend(run_group(group, options, progress or (lambda _: None)))
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[str]:
    """Human-readable ratios of medians: best pipeline vs best raw, and secure vs plain."""
    lines = []
    best: dict[tuple[str, str], float] = {}
    for run in runs:
        key = (run["name"], run["mode"])
        best[key] = max(best.get(key, 0.0), run["throughput"])
    for (name, mode), value in best.items():
        if mode == "pipeline" and (name, "raw") in best and best[(name, "raw")]:
            lines.append(f"{name}: pipeline/raw = {value / best[(name, 'raw')]:.2f} "
                         f"({value:.1f} vs {best[(name, 'raw')]:.1f} items/s)")
    for (name, mode), value in best.items():
        if mode == "pipeline" and name.endswith("-secure"):
            plain = best.get((name.removesuffix("-secure") + "-plain", "pipeline"))
            if plain:
                lines.append(f"{name.removesuffix('-secure')}: secure/plain = "
                             f"{value / plain:.2f} ({value:.1f} vs {plain:.1f} items/s)")
            tls = best.get((name + "-tls", "pipeline"))
            if tls:
                lines.append(f"{name.removesuffix('-secure')}: Unix socket / TLS to Redis = "
                             f"{value / tls:.2f} ({value:.1f} vs {tls:.1f} items/s)")
            memory = best.get((name + "-memory", "pipeline"))
            if memory:
                lines.append(f"{name.removesuffix('-secure')}: AOF on/off = "
                             f"{value / memory:.2f} ({value:.1f} vs {memory:.1f} items/s)")
    return lines
