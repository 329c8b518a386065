"""Which ONNX Runtime execution providers a model runs on: CPU, or an NVIDIA GPU through CUDA
or TensorRT. Pure choice and checks (no GPU needed to test them); the engine applies them.

- ``device``: ``cpu``, or ``cuda`` / ``cuda:N`` (the N-th GPU).
- ``execution_provider``: ``auto`` (on a GPU: TensorRT when this ONNX Runtime has it, else
  CUDA; the choice is logged), ``cpu``, ``cuda`` or ``tensorrt``.
- ``precision``: ``fp32``; ``fp16`` and ``int8`` are TensorRT's (an INT8 engine needs a
  model with quantize/dequantize nodes, as ``ppml-serve model quantize`` writes).

TensorRT's engine cache stays off: a serialized engine holds the model's weights in the
clear, and no plaintext model may reach a disk. Engines are rebuilt when a version loads
(its warm-up, if declared, then runs before it is READY).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ppml_serve.errors import EngineError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICE = re.compile(r"cpu|cuda(?::(\d{1,2}))?")
GPU_EXTRA = ("install ONNX Runtime's GPU build: pip uninstall -y onnxruntime && pip install "
             "'ppml-serve[gpu]' (see docs/models.md, 'GPUs')")


@dataclass(frozen=True)
class ProviderChoice:
    """What a session is created with, and where its inputs live."""

    providers: list[str | tuple[str, dict[str, Any]]]
    device_type: str = "cpu"
    """``cpu`` or ``cuda``: where the engine binds its inputs."""
    device_id: int = 0
    label: str = "CPU"
    """For logs and errors: e.g. ``TensorRT fp16 on cuda:0``."""
    wanted: str = CPU
    """The provider that must run the model (ONNX Runtime falls back to the CPU silently)."""
    options: dict[str, Any] = field(default_factory=dict)


def parse_device(device: str) -> tuple[str, int]:
    """``("cpu", 0)`` or ``("cuda", N)``; ``EngineError`` for anything else."""
    match = DEVICE.fullmatch(device)
    if match is None:
        raise EngineError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu", 0
    return "cuda", int(match.group(1) or 0)


def choose_providers(device: str, requested: str, precision: str,
                     available: list[str]) -> ProviderChoice:
    """The providers for ``device`` and ``requested`` given what this ONNX Runtime has
    (``onnxruntime.get_available_providers()``); each impossible ask is an ``EngineError``
    that says what to change."""
    kind, index = parse_device(device)
    if requested not in ("auto", "cpu", "cuda", "tensorrt"):
        raise EngineError(f"execution_provider {requested!r}: expected auto, cpu, cuda or "
                          "tensorrt")
    if kind == "cpu":
        if requested in ("cuda", "tensorrt"):
            raise EngineError(f"execution_provider {requested} runs on a GPU: set device to "
                              "cuda (or cuda:N)")
        if precision != "fp32":
            raise EngineError(f"precision {precision} on the CPU: ONNX Runtime runs float "
                              "models in fp32 there (bf16: engine openvino; fp16/int8: "
                              "execution_provider tensorrt on a GPU)")
        return ProviderChoice([CPU])
    if requested == "cpu":
        raise EngineError(f"execution_provider cpu with device {device}: set device to cpu")
    gpu = [name for name in (TENSORRT, CUDA) if name in available]
    if not gpu:
        raise EngineError(f"device {device}: this ONNX Runtime has no GPU provider "
                          f"(it has {', '.join(available) or 'none'}); {GPU_EXTRA}")
    if requested == "auto":
        requested = "tensorrt" if TENSORRT in available else "cuda"
    wanted = TENSORRT if requested == "tensorrt" else CUDA
    if wanted not in available:
        raise EngineError(f"execution_provider {requested}: this ONNX Runtime lacks "
                          f"{wanted} (it has {', '.join(available)}); {GPU_EXTRA}")
    if precision not in ("fp32", "fp16", "int8") or (precision != "fp32"
                                                      and wanted != TENSORRT):
        raise EngineError(f"precision {precision} with {requested}: fp16 and int8 are built "
                          "by TensorRT (execution_provider tensorrt); CUDA runs the model's "
                          "own types; bf16 is OpenVINO's")
    cuda_options: dict[str, Any] = {"device_id": index}
    providers: list[str | tuple[str, dict[str, Any]]] = []
    options = cuda_options
    if wanted == TENSORRT:
        options = {"device_id": index, "trt_fp16_enable": precision == "fp16",
                   "trt_int8_enable": precision == "int8",
                   # a cached engine would hold the weights in the clear on disk
                   "trt_engine_cache_enable": False}
        providers.append((TENSORRT, options))
    if CUDA in available:  # nodes TensorRT cannot take run on CUDA rather than the CPU
        providers.append((CUDA, cuda_options))
    providers.append(CPU)
    name = "TensorRT" if wanted == TENSORRT else "CUDA"
    return ProviderChoice(providers, "cuda", index, f"{name} {precision} on cuda:{index}",
                          wanted, options)


def check_used(choice: ProviderChoice, used: list[str]) -> None:
    """ONNX Runtime starts on the CPU alone when a GPU provider cannot start (no GPU, a
    missing CUDA or TensorRT library): refuse that instead of serving slowly on the CPU."""
    if choice.wanted not in used:
        raise EngineError(f"{choice.label}: ONNX Runtime could not start {choice.wanted} "
                          f"(it runs on {', '.join(used) or 'nothing'}): no GPU visible to "
                          "this process, or the CUDA/TensorRT libraries are missing "
                          "(nvidia-smi; the gpu extra's libraries)")
