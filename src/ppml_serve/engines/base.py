"""The engine contract. Engines load models from bytes so that decrypted models stay in memory."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ppml_serve.codecs.tensors import ModelSpec


class Engine(Protocol):
    """A loaded model. ``infer`` takes and returns whole batches (first dimension)."""

    @property
    def spec(self) -> ModelSpec: ...

    def infer(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]: ...


def load_engine(name: str, model: bytes, engine: str = "onnxruntime", threads: int = 0) -> Engine:
    """Load ``model`` (ONNX bytes) into the named engine."""
    if engine == "onnxruntime":
        from ppml_serve.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(name, model, threads)
    raise ValueError(f"unknown engine {engine!r} (available: onnxruntime)")
