"""The model's input checks (the worker's), tensors, and the queue record framing (the
KServe v2 bodies are the native front's: ppml-core's ``v2.rs`` and ``response.rs``)."""

from __future__ import annotations

import numpy as np
import pytest

from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import (
    ModelSpec,
    TensorSpec,
    as_tensor,
    datatype_name,
    deserialize_bytes,
)
from ppml_serve.errors import InvalidInput, ProtocolError

SPEC = ModelSpec("demo", (TensorSpec("image", "UINT8", (-1, 8, 8)),),
                 (TensorSpec("probabilities", "FP32", (-1, 10)),))


def test_spec_checks_name_dtype_shape_and_missing() -> None:
    with pytest.raises(InvalidInput, match=r"'image'.*FP32"):
        SPEC.check_inputs({"image": np.zeros((1, 8, 8), np.float32)})
    with pytest.raises(InvalidInput, match=r"'image'.*shape"):
        SPEC.check_inputs({"image": np.zeros((1, 8), np.uint8)})
    with pytest.raises(InvalidInput, match="'image' is missing"):
        SPEC.check_inputs({})
    with pytest.raises(InvalidInput, match="'other' is not an input"):
        SPEC.check_inputs({"image": np.zeros((1, 8, 8), np.uint8), "other": np.zeros(1)})


def test_record_round_trip_is_exact() -> None:
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.array([True, False]), "c": np.zeros((0, 3), np.int64)}
    meta, restored = record.unpack(record.pack(tensors, {"k": 1}))
    assert meta == {"k": 1}
    for name, array in tensors.items():
        assert restored[name].dtype == array.dtype and np.array_equal(restored[name], array)


@pytest.mark.parametrize("mutate", [
    lambda b: b[:5], lambda b: b"XX" + b[2:], lambda b: b + b"\x00", lambda b: b[:-1],
    lambda b: b[:3] + (10**6).to_bytes(4, "little") + b[7:],
])
def test_record_framing_errors(mutate) -> None:  # type: ignore[no-untyped-def]
    packed = record.pack({"a": np.arange(4, dtype=np.int32)})
    with pytest.raises(ProtocolError):
        record.unpack(mutate(packed))


def test_bytes_tensors_round_trip_through_records() -> None:
    text = as_tensor(np.array([["spam", "été"], ["", "x"]]))
    assert text.dtype == object and text[0, 1] == "été".encode()
    _, tensors = record.unpack(record.pack({"text": text, "n": np.arange(2, dtype=np.int8)}))
    np.testing.assert_array_equal(tensors["text"], text)
    assert tensors["text"].shape == (2, 2)
    spec = ModelSpec("m", (TensorSpec("text", "BYTES", (-1, 2)),), ())
    spec.check_inputs({"text": text})
    with pytest.raises(InvalidInput, match="datatype BYTES does not match the model's FP32"):
        ModelSpec("m", (TensorSpec("text", "FP32", (-1, 2)),), ()).check_inputs({"text": text})



def test_malformed_bytes_data_is_refused_in_words() -> None:
    with pytest.raises(InvalidInput, match="prefixed by its length"):
        deserialize_bytes(b"\x05\x00\x00\x00ab", [1])
    with pytest.raises(InvalidInput, match="has 1 elements but shape \\[2\\] needs 2"):
        deserialize_bytes(b"\x00\x00\x00\x00", [2])
    with pytest.raises(InvalidInput, match="must hold bytes or str"):
        as_tensor(np.array([1, "a"], dtype=object))
    with pytest.raises(InvalidInput, match="text: pass bytes or str"):
        datatype_name(np.dtype("S3"))
    forged = record.pack({"text": np.array([b"ab"], dtype=object)}).replace(b'"nbytes":6',
                                                                              b'"nbytes":5')
    with pytest.raises(ProtocolError):
        record.unpack(forged[:-1])
