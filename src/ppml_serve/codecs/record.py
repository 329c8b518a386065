"""Framing of tensors inside a queue record (before sealing): no pickle, fully validated.

Layout: ``b"PT"``, version byte, 4-byte little-endian header length, a JSON header
``{"meta": {...}, "tensors": [{"name", "datatype", "shape"}, ...]}``, then each tensor's
raw C-order bytes in header order.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ppml_serve.codecs.tensors import datatype_name, numpy_dtype
from ppml_serve.errors import InvalidInput, ProtocolError

_MAGIC = b"PT\x01"
_PREFIX = struct.Struct("<3sI")
MAX_HEADER = 1 << 20


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
        specs = header["tensors"]
        meta = header["meta"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("record header is not valid") from None
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for spec in specs:
            dtype = numpy_dtype(spec["datatype"])
            shape = tuple(int(d) for d in spec["shape"])
            if any(d < 0 for d in shape):
                raise ProtocolError("record has a negative dimension")
            count = int(np.prod(shape, dtype=np.int64))
            size = count * dtype.itemsize
            if offset + size > len(view):
                raise ProtocolError("record is shorter than its header says")
            tensors[str(spec["name"])] = np.frombuffer(
                view, dtype=dtype, count=count, offset=offset
            ).reshape(shape)
            offset += size
    except (KeyError, TypeError, ValueError, InvalidInput):
        raise ProtocolError("record tensor description is not valid") from None
    if offset != len(view):
        raise ProtocolError("record has trailing bytes")
    return meta, tensors
