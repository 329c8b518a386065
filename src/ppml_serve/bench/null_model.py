"""A "null" model with ResNet-50's interface (FP32 [N, 3, 224, 224] in, [N, 1000] out) that
does next to nothing, so that a benchmark of it measures the pipeline alone. Built with
``onnx`` (the ``quantize`` extra) on the benchmarking machine, never shipped."""

from __future__ import annotations

from pathlib import Path

from ppml_serve.errors import ConfigError


def build_null_model(path: Path) -> Path:
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ConfigError("--null-model needs onnx: pip install 'ppml-serve[quantize]'") from None
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
        helper.make_node("Expand", ["column", "width"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "null",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1000])],
        initializer=[helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("width", TensorProto.INT64, [2], [1, 1000])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path
