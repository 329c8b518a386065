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
    return InferRequest(request_id, inputs, outputs, binary_default, parameters)


def check_outputs(request: InferRequest, spec: ModelSpec) -> None:
    """Requested outputs must exist in the model."""
    if request.outputs is None:
        return
    known = {output.name for output in spec.outputs}
    for name in request.outputs:
        if name not in known:
            raise InvalidInput(
                f"output {name!r} is not an output of model {spec.name!r} "
                f"(available: {', '.join(sorted(known))})"
            )


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray[Any, Any]],
    model_version: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode outputs; returns the body and, when any output is binary, the JSON part's size."""
    selected = request.outputs or dict.fromkeys(outputs, request.binary_default)
    described: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, binary in selected.items():
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {
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
