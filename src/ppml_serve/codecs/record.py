"""Framing of tensors inside a queue record (before sealing): no pickle, fully validated.

Layout: ``b"PT"``, version byte, 4-byte little-endian header length, a JSON header
``{"meta": {...}, "tensors": [{"name", "datatype", "shape"}, ...]}``, then each tensor's
raw C-order bytes in header order. A BYTES tensor's entry also gives its size (``nbytes``)
and its bytes are its binary form (each element's 4-byte little-endian length, then its bytes).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ppml_serve import _native
from ppml_serve.codecs.tensors import (
    BYTES,
    datatype_name,
    deserialize_bytes,
    numpy_dtype,
    tensor_bytes,
)

_MAGIC = b"PT\x01"
_PREFIX = struct.Struct("<3sI")
MAX_HEADER = 1 << 20
MAX_TENSORS = 256


def pack(tensors: dict[str, np.ndarray[Any, Any]], meta: dict[str, Any] | None = None) -> bytes:
    """Frame named tensors (and small JSON metadata) as one byte string."""
    described: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    for name, array in tensors.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_name(array.dtype),
                                 "shape": list(array.shape)}
        data = tensor_bytes(array)
        if entry["datatype"] == BYTES:
            entry["nbytes"] = len(data)
        described.append(entry)
        parts.append(data)
    header = json.dumps({"meta": meta or {}, "tensors": described},
                        separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(_MAGIC, len(header)), header, *parts])


def unpack(data: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Inverse of ``pack``; arrays are read-only views into ``data``. The framing is checked
    by ppml-core (Rust), the one parser of records that both languages share."""
    raw = data if isinstance(data, bytes) else bytes(data)
    meta, entries = _native.parse_record(raw)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, datatype, shape, offset, nbytes in entries:
        if datatype == BYTES:  # checked whole by the parser
            tensors[name] = deserialize_bytes(memoryview(raw)[offset:offset + nbytes], shape,
                                              f"tensor {name!r}")
            continue
        dtype = numpy_dtype(datatype)
        tensors[name] = np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize,
                                      offset=offset).reshape(shape)
    return json.loads(meta), tensors
