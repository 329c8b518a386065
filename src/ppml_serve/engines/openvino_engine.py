"""OpenVINO engine (CPU), loading ONNX or OpenVINO IR from memory.

Precision is explicit: on CPUs with bf16 support OpenVINO would silently run an "FP32" model
in bf16 unless ``INFERENCE_PRECISION_HINT`` is set, so ``fp32`` pins f32 and ``bf16`` is a
separate, named choice. INT8 comes from the model itself (QDQ nodes from ``model quantize``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import openvino as ov

from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.engines.package import IR_GRAPH, IR_WEIGHTS, ModelPackage
from ppml_serve.errors import EngineError

_OV_TYPES = {
    "boolean": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64",
    "i8": "INT8", "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16",
    "f32": "FP32", "f64": "FP64",
}


def _spec(port: Any) -> TensorSpec:
    element = port.get_element_type().get_type_name()
    datatype = _OV_TYPES.get(element)
    if datatype is None:
        hint = ": serve models with string (BYTES) tensors with onnxruntime" \
            if element == "string" else ""
        raise EngineError(f"tensor {port.get_any_name()!r} has unsupported type {element}{hint}")
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), datatype, shape)


class OpenVinoEngine:
    """One compiled model; ``streams`` infer requests can run at once (one per thread)."""

    def __init__(self, name: str, model: ModelPackage, threads: int = 0,
                 precision: str = "fp32", streams: int = 1) -> None:
        if precision not in ("fp32", "bf16"):
            raise EngineError(f"OpenVINO precision must be fp32 or bf16, not {precision!r}")
        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
            "NUM_STREAMS": str(max(1, streams)),
            "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            if model.format == "openvino":
                weights = ov.Tensor(np.frombuffer(model.files[IR_WEIGHTS], np.uint8).copy())
                graph = core.read_model(model.files[IR_GRAPH].decode(), weights)
            else:
                graph = core.read_model(model.files["model.onnx"])
            self._compiled = core.compile_model(graph, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise EngineError(f"model {name!r} could not be loaded by OpenVINO: "
                              f"{type(exc).__name__}") from None
        self._spec = ModelSpec(name, tuple(_spec(p) for p in self._compiled.inputs),
                               tuple(_spec(p) for p in self._compiled.outputs), "openvino")
        self._outputs = list(self._compiled.outputs)
        self._local = threading.local()
        self.precision = precision

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def infer(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        request = getattr(self._local, "request", None)
        if request is None:  # one infer request per calling thread: calls may overlap
            request = self._local.request = self._compiled.create_infer_request()
        try:
            results = request.infer(inputs)
        except Exception as exc:
            raise EngineError(f"model {self._spec.name!r} failed: {type(exc).__name__}") from None
        return {spec.name: np.array(results[port], copy=True)
                for spec, port in zip(self._spec.outputs, self._outputs, strict=True)}
