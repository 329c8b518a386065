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

from ppml_serve import _native
from ppml_serve.codecs.tensors import datatype_name, numpy_dtype

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
    """Inverse of ``pack``; arrays are read-only views into ``data``. The framing is checked
    by ppml-core (Rust), the one parser of records that both languages share."""
    raw = data if isinstance(data, bytes) else bytes(data)
    meta, entries = _native.parse_record(raw)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, datatype, shape, offset, nbytes in entries:
        dtype = numpy_dtype(datatype)
        tensors[name] = np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize,
                                      offset=offset).reshape(shape)
    return json.loads(meta), tensors
