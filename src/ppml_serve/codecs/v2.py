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

from ppml_serve.codecs.tensors import ModelSpec, check_shape, datatype_name, numpy_dtype
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


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def _binary_flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameters.{key} must be true or false")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(f"{where}: shape must be a list of non-negative integers")
    return check_shape(tuple(value), where)


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a request body; every problem is an ``InvalidInput`` naming what is wrong."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
        if not 0 < json_size <= len(body):
            raise InvalidInput("Inference-Header-Content-Length is outside the body")
    else:
        json_size = len(body)
    try:
        document = json.loads(body[:json_size])
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON") from None
    except RecursionError:
        raise InvalidInput("request body is nested too deeply") from None
    document = _object(document, "request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    parameters = _object(document.get("parameters", {}), "parameters")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inputs must be a non-empty list")

    binary = memoryview(body)[json_size:]
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for position, raw in enumerate(raw_inputs):
        item = _object(raw, f"inputs[{position}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{position}]: name must be a non-empty string")
        where = f"input {name!r}"
        if name in inputs:
            raise InvalidInput(f"{where} appears more than once")
        dtype = numpy_dtype(str(item.get("datatype")), where)
        shape = _shape(item.get("shape"), where)
        count = math.prod(shape)
        item_parameters = _object(item.get("parameters", {}), f"{where}: parameters")
        size = item_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise InvalidInput(
                    f"{where}: binary_data_size {size} does not match shape {list(shape)} "
                    f"of {dtype.name} ({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise InvalidInput(f"{where}: binary data is shorter than binary_data_size")
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"{where}: has neither data nor binary_data_size")
            try:
                array = np.asarray(item["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise InvalidInput(f"{where}: data cannot be read as {dtype.name}") from None
            if array.size != count:
                raise InvalidInput(
                    f"{where}: data has {array.size} elements but shape {list(shape)} "
                    f"needs {count}"
                )
        inputs[name] = array.reshape(shape)  # sizes agree and dims are bounded: cannot fail
    if offset != len(binary):
        raise InvalidInput("binary data is longer than the inputs' binary_data_size")

    binary_default = _binary_flag(parameters, "binary_data_output", "request")
    outputs: dict[str, bool] | None = None
    classification: dict[str, int] = {}
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("outputs must be a list")
        outputs = {}
        for position, raw in enumerate(raw_outputs):
            item = _object(raw, f"outputs[{position}]")
            name = item.get("name")
            if not isinstance(name, str):
                raise InvalidInput(f"outputs[{position}]: name must be a string")
            item_parameters = _object(item.get("parameters", {}), f"output {name!r}: parameters")
            if "binary_data" in item_parameters:
                outputs[name] = _binary_flag(item_parameters, "binary_data", f"output {name!r}")
            else:
                outputs[name] = binary_default
            if "classification" in item_parameters:
                count = item_parameters["classification"]
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise InvalidInput(f"output {name!r}: parameters.classification must be a "
                                       "positive integer (the number of classes to return)")
                classification[name] = count
    return InferRequest(request_id, inputs, outputs, binary_default, parameters, classification)


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


def serialize_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """A BYTES tensor's binary form: each element's length (4 bytes, little-endian), then
    its bytes, in C order."""
    parts: list[bytes] = []
    for item in array.ravel():
        parts += [len(item).to_bytes(4, "little"), item]
    return b"".join(parts)


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
                entry["data"] = [item.decode() for item in classes.ravel()]
            described.append(entry)
            continue
        array = np.ascontiguousarray(outputs[name])
        entry = {
            "name": name,
            "datatype": datatype_name(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            chunks.append(array.data.cast("B") if array.size else b"")
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
