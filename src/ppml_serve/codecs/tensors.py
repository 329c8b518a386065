"""Datatypes and tensor specs shared by the gateway, the worker and the engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ppml_serve.errors import InvalidInput


class TooManyRows(InvalidInput):
    """More rows in one request than a worker takes (the gateway answers 413)."""

# KServe v2 datatype names. BYTES (variable-length byte strings, text) is held in numpy as an
# object array of ``bytes``; on the wire and in records it is its binary form (each element's
# 4-byte little-endian length, then its bytes).
BYTES = "BYTES"
_DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in _DATATYPES.items()}


def numpy_dtype(datatype: str, where: str = "tensor") -> np.dtype[Any]:
    """The numpy dtype of a v2 datatype name; ``InvalidInput`` for unknown or unsupported ones."""
    try:
        return _DATATYPES[datatype]
    except KeyError:
        supported = ", ".join(_DATATYPES)
        raise InvalidInput(
            f"{where}: unsupported datatype {datatype!r} (supported: {supported})"
        ) from None


def datatype_name(dtype: np.dtype[Any]) -> str:
    """The v2 datatype name of a numpy dtype (native byte order)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "O":
        return BYTES
    try:
        return _NAMES[dtype.newbyteorder("=")]
    except KeyError:
        hint = " (text: pass bytes or str, sent as BYTES)" if dtype.kind in "SU" else ""
        raise InvalidInput(f"unsupported numpy dtype {dtype}{hint}") from None


def as_tensor(given: Any, where: str = "tensor") -> np.ndarray[Any, Any]:
    """``array`` as the service carries it: text (numpy ``str_``/``bytes_`` arrays, or object
    arrays of ``str``) becomes an object array of UTF-8 ``bytes``; anything else is kept."""
    array: np.ndarray[Any, Any] = np.asarray(given)
    if array.dtype.kind not in "OSU":
        return array
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        if isinstance(item, str):
            out[index] = item.encode()
        elif isinstance(item, bytes):
            out[index] = item
        else:
            raise InvalidInput(f"{where}: an object array must hold bytes or str (BYTES), "
                               f"not {type(item).__name__}")
    return out


def serialize_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """A BYTES tensor's binary form: each element's length (4 bytes, little-endian), then
    its bytes, in C order."""
    parts: list[bytes] = []
    for item in array.ravel():
        parts += [len(item).to_bytes(4, "little"), item]
    return b"".join(parts)


def deserialize_bytes(data: bytes | memoryview, shape: list[int] | tuple[int, ...],
                      where: str = "tensor") -> np.ndarray[Any, Any]:
    """The object array of ``bytes`` that a BYTES tensor's binary form holds, shaped
    ``shape``; ``InvalidInput`` when the form is malformed or the count differs."""
    view = memoryview(data).cast("B")
    items: list[bytes] = []
    at, end = 0, len(view)
    while at < end:
        if end - at < 4:
            raise InvalidInput(f"{where}: BYTES data must be elements each prefixed by its "
                               "length (4 bytes, little-endian)")
        size = int.from_bytes(view[at:at + 4], "little")
        at += 4
        if size > end - at:
            raise InvalidInput(f"{where}: BYTES data must be elements each prefixed by its "
                               "length (4 bytes, little-endian)")
        items.append(bytes(view[at:at + size]))
        at += size
    count = 1
    for dim in shape:
        count *= dim
    if len(items) != count:
        raise InvalidInput(f"{where}: BYTES data has {len(items)} elements but shape "
                           f"{list(shape)} needs {count}")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def tensor_bytes(array: np.ndarray[Any, Any]) -> bytes | memoryview:
    """An array's bytes on the wire: raw C order, or the binary form for BYTES."""
    if array.dtype.kind == "O":
        return serialize_bytes(array)
    contiguous = np.ascontiguousarray(array)
    return contiguous.data.cast("B") if contiguous.size else b""


def text_items(array: np.ndarray[Any, Any], where: str) -> list[str]:
    """A BYTES tensor's elements as JSON strings: UTF-8 text only (JSON cannot carry other
    bytes; ask for the output with ``binary_data`` instead)."""
    try:
        return [item.decode() for item in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(f"{where} holds bytes that are not UTF-8 text, which JSON cannot "
                           "carry: ask for it with parameters.binary_data = true") from None


@dataclass(frozen=True)
class TensorSpec:
    """A declared model input or output; ``-1`` in ``shape`` matches any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    def check(self, array: np.ndarray[Any, Any]) -> None:
        """Raise ``InvalidInput`` naming this input if ``array`` does not fit the spec."""
        actual = datatype_name(array.dtype)
        if actual != self.datatype:
            raise InvalidInput(
                f"input {self.name!r}: datatype {actual} does not match the model's {self.datatype}"
            )
        if len(array.shape) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, array.shape, strict=True)
        ):
            raise InvalidInput(
                f"input {self.name!r}: shape {list(array.shape)} does not match the model's "
                f"{list(self.shape)} (-1 = any size)"
            )


@dataclass(frozen=True)
class ModelSpec:
    """What a model accepts and returns, as published by its workers."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = "onnxruntime"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": self.platform,
            "inputs": [spec.as_json() for spec in self.inputs],
            "outputs": [spec.as_json() for spec in self.outputs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            name=str(data["name"]),
            platform=str(data.get("platform", "onnxruntime")),
            inputs=tuple(TensorSpec.from_json(item) for item in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(item) for item in data["outputs"]),
        )

    def check_inputs(self, inputs: dict[str, np.ndarray[Any, Any]],
                     max_rows: int | None = None) -> None:
        """Every declared input present with the right dtype and shape, nothing else, and at
        most ``max_rows`` rows (first dimension) per input."""
        declared = {spec.name for spec in self.inputs}
        for name in inputs:
            if name not in declared:
                raise InvalidInput(
                    f"input {name!r} is not an input of model {self.name!r} "
                    f"(expected: {', '.join(sorted(declared))})"
                )
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInput(f"input {spec.name!r} is missing")
            spec.check(inputs[spec.name])
        batch_sizes = {array.shape[0] for array in inputs.values() if array.ndim}
        if len(batch_sizes) > 1:
            raise InvalidInput("inputs disagree on the batch size (first dimension)")
        if max_rows is not None and batch_sizes and max(batch_sizes) > max_rows:
            raise TooManyRows(f"the request has {max(batch_sizes)} rows; at most {max_rows} "
                              "per request (split it, or raise worker.max_rows_per_request)")
