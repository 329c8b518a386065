"""Model warm-up: synthetic batches run once a version is loaded, before it takes requests."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ppml_serve.codecs.tensors import BYTES, TensorSpec, numpy_dtype
from ppml_serve.engines.base import Engine
from ppml_serve.errors import ConfigError, EngineError, InvalidInput
from ppml_serve.repository.config import Warmup

log = logging.getLogger("ppml_serve.worker")


def warmup_inputs(spec: tuple[TensorSpec, ...], warmup: Warmup,
                  rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
    """One batch of ``warmup.batch_size`` rows for inputs declared as ``spec``."""
    unknown = set(warmup.shapes) - {tensor.name for tensor in spec}
    if unknown:
        raise ConfigError(f"warmup.shapes: {sorted(unknown)} are not inputs of the model "
                          f"(inputs: {', '.join(tensor.name for tensor in spec)})")
    inputs = {}
    for tensor in spec:
        declared = warmup.shapes.get(tensor.name, list(tensor.shape))
        if len(declared) != len(tensor.shape):
            raise ConfigError(f"warmup.shapes.{tensor.name}: {declared} has {len(declared)} "
                              f"dimensions, the model's input {list(tensor.shape)} has "
                              f"{len(tensor.shape)}")
        shape = [warmup.batch_size if index == 0 and size == -1 else size
                 for index, size in enumerate(declared)]
        if any(size < 0 for size in shape):
            raise ConfigError(f"warmup: input {tensor.name!r} has dynamic dimensions "
                              f"{list(tensor.shape)}; give its shape in warmup.shapes")
        inputs[tensor.name] = _data(tensor.datatype, tuple(shape), warmup.data, rng)
    return inputs


def _data(datatype: str, shape: tuple[int, ...], kind: str,
          rng: np.random.Generator) -> np.ndarray[Any, Any]:
    if datatype == BYTES:
        array = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            array[index] = (rng.bytes(8).hex().encode() if kind == "random" else b"")
        return array
    dtype = numpy_dtype(datatype)
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -128), min(info.max, 127), shape, endpoint=True
                        ).astype(dtype)


def run_warmup(engine: Engine, warmup: Warmup, where: str) -> float:
    """Run the warm-up batches; returns their seconds. A failure is a ``ConfigError``
    naming the model (the version does not become READY)."""
    inputs = warmup_inputs(engine.spec.inputs, warmup, np.random.default_rng(0))
    started = time.perf_counter()
    try:
        for _ in range(warmup.runs):
            engine.infer(inputs)
    except (EngineError, InvalidInput) as exc:
        raise ConfigError(f"{where}: warm-up failed ({exc}); check warmup in its "
                          "config.yaml") from None
    seconds = time.perf_counter() - started
    log.info("%s warmed up: %d run(s) of %d row(s) in %.0f ms", where, warmup.runs,
             warmup.batch_size, seconds * 1000)
    return seconds
