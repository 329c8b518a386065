"""KServe v2 request/response bodies and the queue record framing."""

from __future__ import annotations

import json

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
from ppml_serve.codecs.v2 import encode_response, parse_request
from ppml_serve.errors import InvalidInput, ProtocolError

SPEC = ModelSpec("demo", (TensorSpec("image", "UINT8", (-1, 8, 8)),),
                 (TensorSpec("probabilities", "FP32", (-1, 10)),))


def binary_body(arrays: dict[str, np.ndarray], extra: dict | None = None) -> tuple[bytes, str]:
    header = {"inputs": [{"name": n, "datatype": "FP32" if a.dtype == np.float32 else "UINT8",
                          "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
                         for n, a in arrays.items()], **(extra or {})}
    encoded = json.dumps(header).encode()
    return encoded + b"".join(a.tobytes() for a in arrays.values()), str(len(encoded))


def test_json_request() -> None:
    body = json.dumps({"id": "a", "inputs": [{"name": "image", "datatype": "UINT8",
                                              "shape": [1, 8, 8], "data": list(range(64))}]})
    request = parse_request(body.encode(), None)
    assert request.id == "a"
    assert request.inputs["image"].dtype == np.uint8
    assert request.inputs["image"][0, 7, 7] == 63
    SPEC.check_inputs(request.inputs)


def test_nested_json_data_accepted() -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                   "data": [[1, 2], [3, 4]]}]})
    assert parse_request(body.encode(), None).inputs["x"].tolist() == [[1, 2], [3, 4]]


def test_binary_request_and_response() -> None:
    image = np.arange(128, dtype=np.uint8).reshape(2, 8, 8)
    body, length = binary_body({"image": image}, {"parameters": {"binary_data_output": True}})
    request = parse_request(body, length)
    assert np.array_equal(request.inputs["image"], image)
    probabilities = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    payload, header_length = encode_response("demo", request, {"probabilities": probabilities})
    assert header_length is not None
    header = json.loads(payload[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 80
    assert np.array_equal(np.frombuffer(payload[header_length:], np.float32).reshape(2, 10),
                          probabilities)


def test_json_response_when_binary_not_requested() -> None:
    request = parse_request(json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                                    "shape": [0, 8, 8], "data": []}]}).encode(),
                            None)
    payload, header_length = encode_response("demo", request,
                                             {"probabilities": np.ones((1, 2), np.float32)})
    assert header_length is None
    assert json.loads(payload)["outputs"][0]["data"] == [1.0, 1.0]


_BINARY_4 = (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [4], '
             b'"parameters": {"binary_data_size": 4}}]}')


@pytest.mark.parametrize(("body", "length", "message"), [
    (b"[1, 2]", None, "request must be a JSON object"),
    (b'{"inputs": []}', None, "inputs must be a non-empty list"),
    (b'{"inputs": [{"name": "image", "datatype": "STRING", "shape": [1], "data": [1]}]}', None,
     "unsupported datatype"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2], "data": [1]}]}', None,
     "has 1 elements but shape [2] needs 2"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [300]}]}', None,
     "cannot be read as uint8"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1], "data": []}]}', None,
     "non-negative"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1]}]}', None,
     "neither data nor binary_data_size"),
    (_BINARY_4 + b"ab", str(len(_BINARY_4)), "shorter than binary_data_size"),
    (_BINARY_4.replace(b": 4}", b": 3}") + b"abc", str(len(_BINARY_4)), "does not match shape"),
    (b"{}", "999", "outside the body"),
])
def test_bad_requests_are_explained(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request(body, length)


def test_trailing_binary_data_refused() -> None:
    body, length = binary_body({"image": np.zeros((1, 8, 8), np.uint8)})
    with pytest.raises(InvalidInput, match="longer"):
        parse_request(body + b"extra", length)


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


def test_classification_is_triton_shaped_with_labels_and_refuses_non_scores() -> None:
    from ppml_serve.codecs.v2 import classify, serialize_bytes

    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    table = classify(scores, 2, ["cat", "dog", "eel"])
    assert table.tolist() == [[b"0.700000:1:dog", b"0.200000:2:eel"],
                              [b"0.500000:0:cat", b"0.300000:2:eel"]]
    assert classify(scores[0], 5).tolist() == [b"0.700000:1", b"0.200000:2", b"0.100000:0"]
    assert serialize_bytes(np.array([b"ab", b""], dtype=object)) == b"\x02\x00\x00\x00ab" + \
        b"\x00" * 4
    with pytest.raises(InvalidInput, match="float scores"):
        classify(np.zeros((2, 3), np.int64), 1)


def test_classification_counts_are_checked() -> None:
    for count in (0, -1, True, "2"):
        with pytest.raises(InvalidInput, match="positive integer"):
            parse_request(json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                  "shape": [1], "data": [1.0]}],
                                      "outputs": [{"name": "p", "parameters": {
                                          "classification": count}}]}).encode(), None)


def test_bytes_tensors_round_trip_through_records_and_bodies() -> None:
    text = as_tensor(np.array([["spam", "été"], ["", "x"]]))
    assert text.dtype == object and text[0, 1] == "été".encode()
    _, tensors = record.unpack(record.pack({"text": text, "n": np.arange(2, dtype=np.int8)}))
    np.testing.assert_array_equal(tensors["text"], text)
    assert tensors["text"].shape == (2, 2)
    spec = ModelSpec("m", (TensorSpec("text", "BYTES", (-1, 2)),), ())
    spec.check_inputs({"text": text})
    with pytest.raises(InvalidInput, match="datatype BYTES does not match the model's FP32"):
        ModelSpec("m", (TensorSpec("text", "FP32", (-1, 2)),), ()).check_inputs({"text": text})

    request = parse_request(json.dumps({"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]}]}).encode(), None)
    np.testing.assert_array_equal(request.inputs["text"], np.array([b"a", "é".encode()], object))
    body, size = encode_response("m", request, {"text": request.inputs["text"]})
    assert size is None and json.loads(body)["outputs"][0]["data"] == ["a", "é"]

    # JSON cannot carry bytes that are not UTF-8: the error names the binary extension
    raw = np.array([b"\xff"], dtype=object)
    with pytest.raises(InvalidInput, match=r"not UTF-8 text.*binary_data = true"):
        encode_response("m", request, {"text": raw})
    request.binary_default = True
    body, size = encode_response("m", request, {"text": raw})
    assert size is not None and body[size:] == b"\x01\x00\x00\x00\xff"


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
