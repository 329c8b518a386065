"""The engine contract. Engines load models from bytes so that decrypted models stay in memory."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ppml_serve.codecs.tensors import ModelSpec
from ppml_serve.engines.package import ModelPackage
from ppml_serve.errors import EngineError


class Engine(Protocol):
    """A loaded model. ``infer`` takes and returns whole batches (first dimension)."""

    @property
    def spec(self) -> ModelSpec: ...

    def infer(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]: ...


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return "GenuineIntel" in info.read(4096)
    except OSError:
        return False


def resolve_engine(engine: str, model_format: str = "onnx") -> str:
    """``auto`` picks OpenVINO for an IR, and on Intel CPUs when it is installed; else ONNX
    Runtime."""
    if engine == "auto":
        if model_format == "openvino":
            return "openvino"
        return "openvino" if openvino_available() and _intel_cpu() else "onnxruntime"
    return engine


def load_engine(name: str, model: bytes | ModelPackage, engine: str = "onnxruntime",
                threads: int = 0, precision: str = "fp32", streams: int = 1,
                spin_wait: bool = False, device: str = "cpu",
                execution_provider: str = "auto") -> Engine:
    """Load ``model`` (ONNX bytes, or a package: ONNX or OpenVINO IR) into the named engine.

    ``precision`` is the compute precision for float models (``fp32``; with OpenVINO
    ``bf16``; with TensorRT on a GPU ``fp16`` or ``int8``); on the CPU, INT8 is a property of
    the model file (``model quantize``). ``device`` and ``execution_provider``: see
    ``engines/providers.py``.
    """
    package = model if isinstance(model, ModelPackage) else ModelPackage.from_bytes(model, name)
    engine = resolve_engine(engine, package.format)
    if engine == "onnxruntime":
        if package.format != "onnx":
            raise EngineError(f"model {name!r} is an OpenVINO IR: serve it with engine "
                              "'openvino' (or 'auto')")
        import onnxruntime as ort

        from ppml_serve.engines.onnxruntime_engine import OnnxRuntimeEngine
        from ppml_serve.engines.providers import choose_providers

        choice = choose_providers(device, execution_provider, precision,
                                  ort.get_available_providers())
        return OnnxRuntimeEngine(name, package.files["model.onnx"], threads, spin_wait,
                                 choice)
    if device != "cpu" or execution_provider not in ("auto", "cpu"):
        raise EngineError(f"device {device} / execution_provider {execution_provider}: GPUs "
                          "are served by engine onnxruntime (CUDA or TensorRT)")
    if engine == "openvino":
        if not openvino_available():
            raise EngineError("engine 'openvino' is not installed (pip install openvino)")
        from ppml_serve.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(name, package, threads, precision, streams)
    raise EngineError(f"unknown engine {engine!r} (available: onnxruntime, openvino, auto)")
