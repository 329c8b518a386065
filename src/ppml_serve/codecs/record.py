"""Framing of tensors inside a queue record (before sealing): no pickle, fully validated.

Layout: ``b"PT"``, version byte, 4-byte little-endian header length, a JSON header
``{"meta": {...}, "tensors": [{"name", "datatype", "shape"}, ...]}``, then each tensor's
raw C-order bytes in header order.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from ppml_serve.codecs.tensors import check_shape, datatype_name, numpy_dtype
from ppml_serve.errors import InvalidInput, ProtocolError

_MAGIC = b"PT\x01"
_PREFIX = struct.Struct("<3sI")
MAX_HEADER = 1 << 20
MAX_TENSORS = 256


def pack(tensors: dict[str, np.ndarray[Any, Any]], meta: dict[str, Any] | None = None) -> bytes:
    """Frame named tensors (and small JSON metadata) as one byte string."""
    arrays = [np.ascontiguousarray(array) for array in tensors.values()]
    header = json.dumps(
        {
            "meta": meta or {},
            "tensors": [
                {"name": name, "datatype": datatype_name(array.dtype), "shape": list(array.shape)}
                for name, array in zip(tensors, arrays, strict=True)
            ],
        },
        separators=(",", ":"),
    ).encode()
    parts: list[bytes | memoryview] = [_PREFIX.pack(_MAGIC, len(header)), header]
    parts.extend(array.data.cast("B") if array.size else b"" for array in arrays)
    return b"".join(parts)


def unpack(data: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Inverse of ``pack``; arrays are read-only views into ``data``."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise ProtocolError("record too short")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != _MAGIC:
        raise ProtocolError("record has an unknown framing version")
    if header_len > MAX_HEADER or _PREFIX.size + header_len > len(view):
        raise ProtocolError("record header length is invalid")
    offset = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(view[_PREFIX.size : offset]))
    except (ValueError, RecursionError):
        raise ProtocolError("record header is not valid") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict) or \
            not isinstance(header.get("tensors"), list) or len(header["tensors"]) > MAX_TENSORS:
        raise ProtocolError("record header is not valid")
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for spec in header["tensors"]:
        name, dtype, shape = _tensor_spec(spec)
        count = math.prod(shape)  # Python ints: no overflow, whatever the header says
        size = count * dtype.itemsize
        if offset + size > len(view):
            raise ProtocolError("record is shorter than its header says")
        if name in tensors:
            raise ProtocolError("record names a tensor twice")
        tensors[name] = np.frombuffer(view, dtype=dtype, count=count, offset=offset
                                      ).reshape(shape)
        offset += size
    if offset != len(view):
        raise ProtocolError("record has trailing bytes")
    return header["meta"], tensors


def _tensor_spec(spec: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    """Name, dtype and shape of one header entry, each checked before numpy sees it."""
    if not isinstance(spec, dict):
        raise ProtocolError("record tensor description is not valid")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or \
            not isinstance(shape, list) or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError("record tensor description is not valid")
    try:
        return name, numpy_dtype(datatype), check_shape(tuple(shape), "record tensor")
    except InvalidInput:
        raise ProtocolError("record tensor description is not valid") from None
