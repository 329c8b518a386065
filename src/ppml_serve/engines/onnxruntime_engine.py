"""ONNX Runtime engine: CPU, or an NVIDIA GPU through CUDA or TensorRT (``providers.py``).

On a GPU a batch's inputs are bound to device memory (one host-to-device copy per input per
batch) and its outputs bound to host memory (one copy back), through ONNX Runtime's I/O
binding, instead of letting each run allocate and copy on its own."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort

from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.engines.providers import ProviderChoice, check_used
from ppml_serve.errors import EngineError, InvalidInput

log = logging.getLogger("ppml_serve.worker")

_ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(node: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        hint = ""
        if node.type.startswith(("seq(", "map(")):
            # skl2onnx's classifiers end in ZipMap (a sequence of maps) unless told otherwise
            hint = (": a sequence or map output (scikit-learn's ZipMap?) cannot be served; "
                    "convert with skl2onnx's options={id(model): {'zipmap': False}} (or "
                    "{'zipmap': False} for every classifier) to get a probability tensor")
        raise EngineError(f"tensor {node.name!r} has unsupported type {node.type}{hint}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


class OnnxRuntimeEngine:
    """One ONNX Runtime session; ``threads`` = 0 lets ORT use every core."""

    def __init__(self, name: str, model: bytes, threads: int = 0,
                 spin_wait: bool = False, choice: ProviderChoice | None = None) -> None:
        self._choice = choice or ProviderChoice(["CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not spin_wait:
            # Idle pool threads would otherwise spin for work, burning the CPU that the
            # gateway, Redis and this worker's own I/O need on a shared machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(model, options,
                                                 providers=self._choice.providers)
        except Exception as exc:  # ORT raises its own untyped errors (TensorRT: a model it
            # cannot build fails here)
            raise EngineError(f"model {name!r} could not be loaded by ONNX Runtime "
                              f"({self._choice.label}): {type(exc).__name__}") from None
        used = self._session.get_providers()
        check_used(self._choice, used)
        if self._choice.device_type != "cpu":  # the choice 'auto' made, for the operator
            log.info("model %r runs with %s (providers %s)", name, self._choice.label,
                     ", ".join(used))
        self._spec = ModelSpec(
            name=name,
            inputs=tuple(_spec(node) for node in self._session.get_inputs()),
            outputs=tuple(_spec(node) for node in self._session.get_outputs()),
            platform="onnxruntime",
        )
        self._output_names = [spec.name for spec in self._spec.outputs]

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def infer(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        feed = {name: _text(name, array) if array.dtype.kind == "O" else array
                for name, array in inputs.items()}
        try:
            if self._choice.device_type == "cpu" or any(a.dtype.kind == "O"
                                                        for a in feed.values()):
                results = self._session.run(self._output_names, feed)
            else:  # strings stay on the host: ONNX Runtime keeps them there
                results = self.run_bound(feed, self._choice.device_type,
                                         self._choice.device_id)
        except Exception as exc:
            raise EngineError(f"model {self._spec.name!r} failed: {type(exc).__name__}") from None
        return {name: _utf8(result) if result.dtype.kind in "OU" else result
                for name, result in zip(self._output_names, results, strict=True)}


    def run_bound(self, feed: dict[str, np.ndarray[Any, Any]], device_type: str,
                  device_id: int) -> list[np.ndarray[Any, Any]]:
        """One run through I/O binding: each input copied once to ``device_type``, every
        output bound to host memory and copied back once."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device_type,
                                                     device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return [np.asarray(value) for value in binding.copy_outputs_to_cpu()]


def _text(name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A BYTES input as ONNX strings: ORT takes ``str`` (UTF-8 by the ONNX standard) and
    would turn ``bytes`` into their repr."""
    out = np.empty(array.shape, dtype=object)
    try:
        for index, item in np.ndenumerate(array):
            out[index] = item.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r}: BYTES elements must be UTF-8 text for this "
                           "model (ONNX string tensors hold UTF-8)") from None
    return out


def _utf8(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """An ONNX string output as BYTES (object array of UTF-8 ``bytes``)."""
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        out[index] = str(item).encode()
    return out
