"""KServe v2 / Open Inference Protocol REST bodies: JSON tensors and the binary extension.

Binary extension: the ``Inference-Header-Content-Length`` header gives the size of the JSON
part; each input with ``parameters.binary_data_size`` takes that many bytes, in order, from
what follows it. Outputs are returned binary when asked for per output
(``parameters.binary_data``) or for all (``parameters.binary_data_output``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppml_serve import _native
from ppml_serve.codecs.tensors import (
    BYTES,
    ModelSpec,
    datatype_name,
    deserialize_bytes,
    numpy_dtype,
    serialize_bytes,
    tensor_bytes,
    text_items,
)
from ppml_serve.errors import InvalidInput

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    """A decoded request: input arrays and which outputs to return, and how."""

    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: dict[str, bool] | None = None
    """Requested output name -> binary?; ``None`` means all outputs, as ``binary_default``."""
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    classification: dict[str, int] = field(default_factory=dict)
    """Output name -> class count (the classification extension's ``classification``)."""


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a request body; every problem is an ``InvalidInput`` naming what is wrong.

    ppml-core (Rust) parses it, the one decoder of v2 bodies: binary inputs are located in
    ``body`` and viewed, not copied; JSON ``data`` is read straight into typed buffers, without
    a Python object per number."""
    request_id, parameters, entries, outputs, binary_default, classification = \
        _native.parse_v2_request(body, header_length)
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for name, datatype, shape, offset, data, nbytes in entries:
        if datatype == BYTES:  # its elements counted and bounded by the decoder
            source = memoryview(body)[offset:offset + nbytes] if data is None else data
            inputs[name] = deserialize_bytes(source, shape, f"input {name!r}")
            continue
        dtype = numpy_dtype(datatype)
        if data is None:
            array = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=offset)
        else:
            array = np.frombuffer(data, dtype=dtype)
        inputs[name] = array.reshape(shape)  # sizes checked by the decoder: cannot fail
    return InferRequest(request_id, inputs, dict(outputs) if outputs is not None else None,
                        binary_default, json.loads(parameters) if parameters else {},
                        dict(classification))


def described_request(request_id: str | None, parameters: str,
                      outputs: list[tuple[str, bool]] | None, binary_default: bool,
                      classification: list[tuple[str, int]]) -> InferRequest:
    """What answering a request needs when its inputs went to the queue without becoming
    arrays here (``Sealer.seal_v2_request``): its id, parameters and requested outputs."""
    return InferRequest(request_id, {}, dict(outputs) if outputs is not None else None,
                        binary_default, json.loads(parameters) if parameters else {},
                        dict(classification))


MAX_CLASS_COUNT = 1000


def classify(scores: np.ndarray[Any, Any], count: int, labels: list[str] | None = None,
             name: str = "output") -> np.ndarray[Any, Any]:
    """The classification extension: the ``count`` best classes of each row of ``scores``
    (``[batch, classes]``, or ``[classes]``) as Triton writes them, ``"score:index"`` or
    ``"score:index:label"``, best first: a BYTES tensor ``[batch, count]`` (or ``[count]``)."""
    if scores.dtype.kind != "f" or scores.ndim not in (1, 2):
        raise InvalidInput(f"output {name!r}: classification needs float scores shaped "
                           f"[batch, classes], not {scores.dtype} {list(scores.shape)}")
    if count > MAX_CLASS_COUNT:
        raise InvalidInput(f"output {name!r}: classification may ask for at most "
                           f"{MAX_CLASS_COUNT} classes")
    rows = scores.reshape(1, -1) if scores.ndim == 1 else scores
    count = min(count, rows.shape[1])
    best = np.argsort(-rows, axis=1, kind="stable")[:, :count]
    table = np.empty(best.shape, dtype=object)
    for row, indices in enumerate(best):
        for column, index in enumerate(indices):
            text = f"{float(rows[row, index]):f}:{int(index)}"
            if labels and int(index) < len(labels):
                text += f":{labels[int(index)]}"
            table[row, column] = text.encode()
    return table[0] if scores.ndim == 1 else table


def check_outputs(request: InferRequest, spec: ModelSpec) -> None:
    """Requested outputs must exist in the model."""
    if request.outputs is None:
        return
    known = {output.name: output for output in spec.outputs}
    for name in request.outputs:
        if name not in known:
            raise InvalidInput(
                f"output {name!r} is not an output of model {spec.name!r} "
                f"(available: {', '.join(sorted(known))})"
            )
    for name in request.classification:  # refused before the request is queued
        declared = known[name]
        if declared.datatype not in ("FP16", "FP32", "FP64") or len(declared.shape) not in (1, 2):
            raise InvalidInput(f"output {name!r}: classification needs float scores shaped "
                               f"[batch, classes], not {declared.datatype} "
                               f"{list(declared.shape)}")


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray[Any, Any]],
    model_version: str | None = None,
    parameters: dict[str, Any] | None = None,
    labels: list[str] | None = None,
) -> tuple[bytes, int | None]:
    """Encode outputs; returns the body and, when any output is binary, the JSON part's size.
    Outputs asked for with ``classification`` become BYTES tensors of the best classes
    (``labels``: the model's class names, if it has them)."""
    selected = request.outputs or dict.fromkeys(outputs, request.binary_default)
    described: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, binary in selected.items():
        count = request.classification.get(name)
        if count is not None:
            classes = classify(np.asarray(outputs[name]), count, labels, name)
            entry: dict[str, Any] = {"name": name, "datatype": "BYTES",
                                     "shape": list(classes.shape)}
            if binary:
                serialized = serialize_bytes(classes)
                entry["parameters"] = {"binary_data_size": len(serialized)}
                chunks.append(serialized)
            else:
                entry["data"] = text_items(classes, f"output {name!r}")
            described.append(entry)
            continue
        array = outputs[name]
        entry = {
            "name": name,
            "datatype": datatype_name(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            data = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif entry["datatype"] == BYTES:
            entry["data"] = text_items(array, f"output {name!r}")
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "outputs": described}
    if model_version is not None:
        document["model_version"] = model_version
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = parameters
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
