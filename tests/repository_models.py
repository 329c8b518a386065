"""Models the repository tests build from the demo model: a rescaled variant (so versions
answer differently), its OpenVINO IR, and a small TorchScript network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ppml_serve.models import demo_model_path


def scaled_demo(target: Path, factor: float) -> Path:
    """The demo model with its probabilities multiplied by ``factor``."""
    model = onnx.load(str(demo_model_path()))
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_raw" if name == output else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "factor"))
    graph.node.append(helper.make_node("Mul", [f"{output}_raw", "factor"], [output]))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def demo_ir(directory: Path) -> Path:
    """The demo model as OpenVINO IR (FP32 weights kept)."""
    import openvino as ov

    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(demo_model_path())), str(directory / "model.xml"),
                  compress_to_fp16=False)
    return directory / "model.xml"


def torchscript_net(target: Path) -> Path:
    """A small MLP on flattened 8x8 images (fixed seed), saved as TorchScript."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10), torch.nn.Softmax(dim=-1)).eval()
    traced = torch.jit.trace(net, (torch.zeros(2, 64),))
    target.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(target))
    return target


def torch_outputs(source: Path, inputs: np.ndarray) -> np.ndarray:
    import torch

    module = torch.jit.load(str(source)).eval()
    with torch.no_grad():
        return module(torch.from_numpy(inputs)).numpy()


TEXT_LABELS = {"spam": 1, "ham": 0}
"""What the text model maps each word to (anything else: -1)."""


def text_model(target: Path) -> Path:
    """A text model: BYTES ``text`` [-1] in, the same strings (``echo``, ONNX Identity) and
    each string's label (``label`` INT64, ai.onnx.ml LabelEncoder) out."""
    from onnx import TensorProto

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"]),
         helper.make_node("LabelEncoder", ["text"], ["label"], domain="ai.onnx.ml",
                          keys_strings=list(TEXT_LABELS), values_int64s=list(TEXT_LABELS.values()),
                          default_int64=-1)],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [None]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


_KERAS_NET = """
import sys
import numpy as np
import keras
import tensorflow as tf
keras.utils.set_random_seed(0)
features = keras.Input(shape=(64,), name="features")
hidden = keras.layers.Dense(32, activation="relu")(features)
scores = keras.layers.Dense(10, activation="softmax")(hidden)
keras.Model(features, scores).export(sys.argv[1], verbose=False)
inputs = np.load(sys.argv[2])
signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
np.save(sys.argv[3], signature(features=tf.constant(inputs))["output_0"].numpy())
"""


def keras_savedmodel(target: Path, inputs: np.ndarray) -> np.ndarray:
    """A small Keras MLP (fixed seed) exported as a TensorFlow SavedModel at ``target``, and
    TensorFlow's own outputs for ``inputs``. TensorFlow runs in a child process: it never
    shares the test process with torch and the engines."""
    import subprocess
    import sys

    target.parent.mkdir(parents=True, exist_ok=True)
    given, expected = target.parent / "keras-inputs.npy", target.parent / "keras-outputs.npy"
    np.save(given, inputs)
    done = subprocess.run([sys.executable, "-c", _KERAS_NET, str(target), str(given),
                           str(expected)], capture_output=True, text=True, timeout=300,
                          check=False, env={**__import__("os").environ,
                                            "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return np.load(expected)
