"""Static INT8 quantization (ONNX Runtime, QDQ, per-channel weights) with a quality report.

Calibration runs the FP32 model over sample inputs to fix activation ranges; the report
compares INT8 with FP32 top-1 on held-out inputs (and accuracy, when labels are given).

ONNX Runtime's calibrator writes an augmented copy of the model to a temporary directory. For
encrypted models that directory is placed on a RAM-backed filesystem (``/dev/shm``), mode 0700,
removed afterwards, so that no plaintext model reaches a disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppml_serve.engines.onnxruntime_engine import OnnxRuntimeEngine
from ppml_serve.errors import ConfigError

RAM_DIR = Path("/dev/shm")  # noqa: S108 - a private 0700 directory is made inside it


@dataclass(frozen=True)
class Samples:
    inputs: np.ndarray[Any, Any]
    labels: np.ndarray[Any, Any] | None = None


def load_samples(path: Path, input_name: str) -> Samples:
    """Inputs (and optional labels) from a .npy, a .npz or a directory of .npy files."""
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise ConfigError(f"--calibration: {path} holds no .npy files")
        return Samples(np.concatenate([np.load(f, allow_pickle=False) for f in files]))
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    if path.suffix == ".npy":
        return Samples(np.load(path, allow_pickle=False))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            key = input_name if input_name in data else ("images" if "images" in data else None)
            if key is None:
                raise ConfigError(f"{path}: needs an array named {input_name!r} or 'images'")
            labels = data.get("labels", None)
            return Samples(data[key], labels)
    raise ConfigError(f"{path}: expected a .npy or .npz file, or a directory of .npy files")


def not_quantizable(model: bytes) -> str | None:
    """Why ``model`` cannot be quantized here, in one sentence's worth; None if it can."""
    import onnx

    graph = onnx.load_from_string(model).graph
    learned = sorted({node.op_type for node in graph.node if node.domain == "ai.onnx.ml"})
    if learned:
        return (f"it uses ONNX-ML operators ({', '.join(learned[:4])}), as scikit-learn models "
                "converted by skl2onnx do, which ONNX Runtime's INT8 quantization does not "
                "quantize; serve it in FP32 (tree and linear models gain little from INT8)")
    return None


def quantize_bytes(model: bytes, calibration: np.ndarray[Any, Any], input_name: str,
                   batch_size: int = 16, progress: Callable[[int], None] | None = None,
                   in_ram: bool = False) -> bytes:
    """The INT8 (QDQ) version of an ONNX model, calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray[Any, Any]] = (
                calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            if progress is not None:
                progress(len(batch))
            return {input_name: batch}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _scratch_dir(in_ram) as scratch:
        prepared, output = scratch / "prepared.onnx", scratch / "int8.onnx"
        with _tempdir(scratch):
            # Fold constants and infer shapes first, so that every Conv/MatMul has constant
            # weights and bias the quantizer can turn into INT8 kernels.
            quant_pre_process(onnx.load_from_string(model), prepared)
            quantize_static(prepared, output, Reader(),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return output.read_bytes()


@contextlib.contextmanager
def _scratch_dir(in_ram: bool) -> Iterator[Path]:
    base: str | None = None
    if in_ram:
        if not RAM_DIR.is_dir():
            raise ConfigError("quantizing an encrypted model needs a RAM-backed /dev/shm, so that "
                              "no plaintext model is written to disk")
        base = str(RAM_DIR)
    with tempfile.TemporaryDirectory(prefix="ppml-quantize-", dir=base) as directory:
        os.chmod(directory, 0o700)
        yield Path(directory)


@contextlib.contextmanager
def _tempdir(directory: Path) -> Iterator[None]:
    # ONNX Runtime's calibrator makes its own temporary files: keep them in ``directory``.
    saved = tempfile.tempdir
    tempfile.tempdir = str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def top1(engine: OnnxRuntimeEngine, inputs: np.ndarray[Any, Any], input_name: str,
         batch_size: int = 64) -> np.ndarray[Any, Any]:
    output = engine.spec.outputs[0].name
    return np.concatenate([
        engine.infer({input_name: inputs[i:i + batch_size]})[output].argmax(axis=1)
        for i in range(0, len(inputs), batch_size)])


def quality_report(fp32: bytes, int8: bytes, holdout: Samples, input_name: str) -> dict[str, Any]:
    reference = top1(OnnxRuntimeEngine("fp32", fp32), holdout.inputs, input_name)
    quantized = top1(OnnxRuntimeEngine("int8", int8), holdout.inputs, input_name)
    report: dict[str, Any] = {"heldout_samples": len(holdout.inputs),
                              "top1_agreement": round(float((reference == quantized).mean()), 4)}
    if holdout.labels is not None:
        report["fp32_accuracy"] = round(float((reference == holdout.labels).mean()), 4)
        report["int8_accuracy"] = round(float((quantized == holdout.labels).mean()), 4)
    return report
