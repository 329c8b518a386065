"""``ppml-serve model convert``: turn a framework model into a repository version, on the
owner's machine, so that workers only ever need ONNX Runtime or OpenVINO.

- PyTorch TorchScript (``torch.jit.save``) or exported program (``torch.export.save``, ``.pt2``)
  -> ONNX (torch's exporter), and -> OpenVINO IR through that ONNX model, so both formats
  have the same input and output names.
- TensorFlow SavedModel (a directory with ``saved_model.pb``) -> OpenVINO IR (OpenVINO
  reads it itself); checked against TensorFlow's own output of its ``serving_default``
  signature when TensorFlow is installed (the ``convert`` extra brings the CPU wheel).

Every conversion is checked: the converted model runs on random inputs of the declared
shape next to the source model, and the largest difference is reported. torch and
TensorFlow are imported here only, never by a worker.
"""

from __future__ import annotations

import io
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppml_serve.engines import load_engine
from ppml_serve.engines.package import IR_GRAPH, IR_WEIGHTS, ModelPackage
from ppml_serve.errors import ConfigError

Target = Literal["onnx", "openvino"]
_INPUT = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*):([0-9]+(?:,[0-9]+)*):([a-z0-9]+)")
_DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "int8", "bool")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, an example shape (first dimension = batch, left dynamic) and
    dtype, e.g. ``image:1,3,224,224:float32``."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        match = _INPUT.fullmatch(text)
        if match is None or match.group(3) not in _DTYPES:
            raise ConfigError(f"--input {text!r}: expected NAME:D1,D2,...:DTYPE with DTYPE one "
                              f"of {', '.join(_DTYPES)} (e.g. image:1,3,224,224:float32)")
        return cls(match.group(1), tuple(int(d) for d in match.group(2).split(",")),
                   match.group(3))

    def example(self, rng: np.random.Generator) -> np.ndarray[Any, Any]:
        if self.dtype.startswith("float"):
            return rng.standard_normal(self.shape).astype(self.dtype)
        if self.dtype == "bool":
            return rng.integers(0, 2, self.shape).astype(bool)
        return rng.integers(0, 100, self.shape).astype(self.dtype)


@dataclass(frozen=True)
class Conversion:
    package: ModelPackage
    max_abs_diff: float | None
    """Largest difference between source and converted outputs on the check inputs (None
    where the source framework is not installed here to compare with)."""


def source_kind(source: Path) -> str:
    if source.is_dir() and (source / "saved_model.pb").is_file():
        return "tensorflow"
    if source.is_file() and source.suffix == ".pt2":
        return "torch-exported"
    if source.is_file() and source.suffix in (".pt", ".pth", ".torchscript", ".ts"):
        return "torchscript"
    raise ConfigError(f"model convert: {source} is not a TorchScript file (.pt), a torch "
                      "exported program (.pt2) or a TensorFlow SavedModel directory")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError("model convert: PyTorch models need torch on this machine "
                          "(pip install 'ppml-serve[convert]'); workers never do") from None
    return torch


def _torch_to_onnx(source: Path, kind: str, inputs: list[InputSpec],
                   outputs: list[str] | None, examples: list[np.ndarray[Any, Any]]
                   ) -> tuple[bytes, Callable[[list[np.ndarray[Any, Any]]], list[Any]]]:
    torch = _torch()
    args = tuple(torch.from_numpy(example) for example in examples)
    names = [spec.name for spec in inputs]
    buffer = io.BytesIO()
    if kind == "torchscript":
        module = torch.jit.load(str(source), map_location="cpu").eval()
        output_names = outputs or None
        dynamic = {name: {0: "batch"} for name in [*names, *(outputs or [])]}
        torch.onnx.export(module, args, buffer, input_names=names, output_names=output_names,
                          dynamic_axes=dynamic, dynamo=False, opset_version=17)
        call = module
    else:
        program = torch.export.load(str(source))
        with tempfile.TemporaryDirectory() as scratch:  # the dynamo exporter writes files
            target = Path(scratch) / "model.onnx"
            torch.onnx.export(program, args, str(target), input_names=names,
                              output_names=outputs or None, dynamo=True, external_data=False)
            buffer.write(target.read_bytes())
        call = program.module()

    def run(arrays: list[np.ndarray[Any, Any]]) -> list[Any]:
        with torch.no_grad():
            result = call(*(torch.from_numpy(a) for a in arrays))
        results = result if isinstance(result, (tuple, list)) else [result]
        return [r.detach().numpy() for r in results]

    return buffer.getvalue(), run


def _tensorflow_outputs(source: Path, inputs: list[InputSpec],
                        examples: list[np.ndarray[Any, Any]]) -> dict[str, Any] | None:
    """The SavedModel's ``serving_default`` outputs for ``examples``, by name; ``None``
    without TensorFlow (the conversion is then not compared)."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    loaded = tf.saved_model.load(str(source))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ConfigError(f"model convert: {source} has no serving_default signature "
                          "(save it with tf.saved_model.save or Keras's model.export)")
    declared = set(signature.structured_input_signature[1])
    given = {spec.name for spec in inputs}
    if given != declared:
        raise ConfigError(f"model convert: --input names {sorted(given)} must be the "
                          f"signature's inputs {sorted(declared)}")
    result = signature(**{spec.name: tf.constant(example)
                          for spec, example in zip(inputs, examples, strict=True)})
    return {name: tensor.numpy() for name, tensor in result.items()}


def _onnx_to_ir(model: bytes) -> ModelPackage:
    import openvino as ov

    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        onnx_file.write_bytes(model)
        return _save_ir(ov.convert_model(str(onnx_file)), Path(scratch))


def _save_ir(converted: Any, scratch: Path) -> ModelPackage:
    import openvino as ov

    target = scratch / IR_GRAPH
    ov.save_model(converted, str(target), compress_to_fp16=False)  # keep FP32 weights
    return ModelPackage.openvino_ir(target.read_bytes(), (scratch / IR_WEIGHTS).read_bytes())


def convert(source: Path, target: Target, inputs: list[InputSpec],
            outputs: list[str] | None = None) -> Conversion:
    """Convert ``source`` in memory and check the result against it."""
    kind = source_kind(source)
    if not inputs:
        raise ConfigError("model convert: give each input with --input NAME:SHAPE:DTYPE")
    rng = np.random.default_rng(0)
    examples = [spec.example(rng) for spec in inputs]
    by_name: dict[str, Any] | None = None
    reference: list[Any] | None = None
    if kind == "tensorflow":
        if target != "openvino":
            raise ConfigError("model convert: TensorFlow SavedModels convert to OpenVINO IR "
                              "(--to openvino); the worker serves IR natively")
        import openvino as ov

        with tempfile.TemporaryDirectory() as scratch:
            package = _save_ir(ov.convert_model(str(source)), Path(scratch))
        by_name = _tensorflow_outputs(source, inputs, examples)
    else:
        with warnings.catch_warnings():  # the exporters' advice is for torch developers
            warnings.simplefilter("ignore")
            onnx_model, run = _torch_to_onnx(source, kind, inputs, outputs, examples)
        package = ModelPackage.onnx(onnx_model) if target == "onnx" else _onnx_to_ir(onnx_model)
        reference = run(examples)
    engine = load_engine("converted", package, "onnxruntime" if target == "onnx" else "openvino",
                         threads=1)
    got = engine.infer({spec.name: example for spec, example in zip(inputs, examples,
                                                                     strict=True)})
    diff: float | None = None
    if by_name is not None:  # TensorFlow's outputs by name: match them by name
        names = [t.name for t in engine.spec.outputs]
        if set(by_name) <= set(names):
            reference = [by_name[name] for name in names if name in by_name]
        elif len(by_name) == len(names) == 1:
            reference = list(by_name.values())
        else:
            raise ConfigError(f"model convert: TensorFlow's outputs {sorted(by_name)} do not "
                              f"match the converted model's {names}")
    if reference is not None:
        diff = 0.0
        for expected, name in zip(reference, [t.name for t in engine.spec.outputs],
                                  strict=False):
            diff = max(diff, float(np.max(np.abs(np.asarray(got[name], np.float64)
                                                 - np.asarray(expected, np.float64)))))
    return Conversion(package, diff)
