"""The wire contract from both sides: records sealed or framed by the Python implementation
that wrote the queue before ppml-core (the envelope with ``cryptography``'s AES-GCM, the
framing in pure Python) open and parse in the native code, and the other way round; the same
refusals, with the same words. The reference implementations below are the old code, kept
here as the contract's second reader."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from ppml_serve import _native
from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import ModelSpec, TensorSpec, TooManyRows
from ppml_serve.codecs.v2 import parse_request
from ppml_serve.crypto.envelope import Keyring, PlaintextSealer
from ppml_serve.errors import (
    IntegrityError,
    InvalidInput,
    PayloadTooLarge,
    ProtocolError,
)

KEYS = {"old": os.urandom(32), "new": os.urandom(32)}


def reference_seal(key_id: str, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    encoded = key_id.encode()
    header = b"PE\x01" + bytes([len(encoded)]) + encoded + nonce
    return header + AESGCM(KEYS[key_id]).encrypt(nonce, plaintext, header + aad)


def reference_open(record_bytes: bytes, aad: bytes) -> bytes:
    id_end = 4 + record_bytes[3]
    key_id = record_bytes[4:id_end].decode()
    nonce = record_bytes[id_end:id_end + 12]
    return AESGCM(KEYS[key_id]).decrypt(nonce, record_bytes[id_end + 12:],
                                         record_bytes[:id_end + 12] + aad)


@given(st.binary(max_size=4096), st.binary(max_size=64), st.sampled_from(["old", "new"]))
def test_records_of_the_old_implementation_open(plaintext: bytes, aad: bytes, key: str) -> None:
    assert Keyring(KEYS, "new").open(reference_seal(key, plaintext, aad), aad) == plaintext


@given(st.binary(max_size=4096), st.binary(max_size=64))
def test_native_records_open_in_the_old_implementation(plaintext: bytes, aad: bytes) -> None:
    sealed = Keyring(KEYS, "new").seal(plaintext, aad)
    assert sealed[:7] == b"PE\x01\x03new"
    assert reference_open(sealed, aad) == plaintext


def test_every_failure_is_the_same_opaque_error() -> None:
    ring = Keyring(KEYS, "new")
    sealed = ring.seal(b"payload", b"request")
    for tampered, aad in [(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"request"),
                          (sealed, b"reply"), (b"PE\x01\x07unknown" + sealed[10:], b"request"),
                          (sealed[:20], b"request")]:
        with pytest.raises(IntegrityError, match=r"^record failed authentication$"):
            ring.open(tampered, aad)
    with pytest.raises(IntegrityError, match="not a ppml-serve envelope"):
        ring.open(b"XX" + sealed[2:], b"request")
    assert ring.open(memoryview(sealed), b"request") == b"payload"  # any buffer


def test_bad_keys_are_refused_and_never_shown() -> None:
    with pytest.raises(ValueError, match="256-bit"):
        Keyring({"k": b"short"}, "k")
    with pytest.raises(ValueError, match="active key id"):
        Keyring(KEYS, "missing")
    text = repr(Keyring(KEYS, "new"))
    assert "new" in text and KEYS["new"].hex() not in text and str(KEYS["new"]) not in text


def reference_pack(tensors: dict[str, np.ndarray], meta: dict[str, object]) -> bytes:
    header = json.dumps({"meta": meta, "tensors": [
        {"name": n, "datatype": str(a.dtype).upper().replace("FLOAT", "FP"), "shape": list(a.shape)}
        for n, a in tensors.items()]}, separators=(",", ":")).encode()
    return struct.pack("<3sI", b"PT\x01", len(header)) + header + b"".join(
        np.ascontiguousarray(a).tobytes() for a in tensors.values())


arrays = st.lists(st.tuples(st.sampled_from([np.uint8, np.int32, np.float32, np.float64]),
                            st.lists(st.integers(0, 3), min_size=1, max_size=3)), max_size=4)


@given(arrays)
def test_records_framed_either_way_parse_the_same(specs: list[tuple[type, list[int]]]) -> None:
    tensors = {f"t{i}": (np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape))
               for i, (dtype, shape) in enumerate(specs)}
    ours = record.pack(tensors, {"k": 1})
    assert ours == reference_pack(tensors, {"k": 1})
    meta, parsed = record.unpack(ours)
    assert meta == {"k": 1} and list(parsed) == list(tensors)
    for name, array in tensors.items():
        assert parsed[name].dtype == array.dtype and np.array_equal(parsed[name], array)


@pytest.mark.parametrize(("data", "words"), [
    (b"PT", "record too short"),
    (b"PT\x02\0\0\0\0", "unknown framing version"),
    (b"PT\x01\xff\xff\xff\x7f", "header length is invalid"),
    (struct.pack("<3sI", b"PT\x01", 2) + b"[]", "header is not valid"),
    (reference_pack({"x": np.zeros(2, np.float32)}, {})[:-1], "shorter than its header says"),
    (reference_pack({"x": np.zeros(2, np.float32)}, {}) + b"!", "trailing bytes"),
])
def test_malformed_records_are_protocol_errors_naming_why(data: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        record.unpack(data)


SPEC = ModelSpec("demo", (TensorSpec("image", "UINT8", (-1, 2, 2)),
                          TensorSpec("mask", "BOOL", (-1,))), ())
NATIVE_SPEC = _native.ModelInputs("demo", [(t.name, t.datatype, list(t.shape))
                                           for t in SPEC.inputs])


def _body(*inputs: dict[str, object]) -> bytes:
    return json.dumps({"inputs": list(inputs), "outputs": [{"name": "p"}]}).encode()


IMAGE = {"name": "image", "datatype": "UINT8", "shape": [2, 2, 2], "data": list(range(8))}
MASK = {"name": "mask", "datatype": "BOOL", "shape": [2], "data": [True, False]}
ADMISSION_CASES = [
    _body(IMAGE, MASK),
    _body(IMAGE),
    _body({**IMAGE, "name": "img"}, MASK),
    _body({**IMAGE, "datatype": "INT8"}, MASK),
    _body({**IMAGE, "shape": [2, 4]}, MASK),
    _body(IMAGE, {**MASK, "shape": [3], "data": [1, 0, 1]}),
    _body({**IMAGE, "shape": [3, 2, 2], "data": list(range(12))},
          {**MASK, "shape": [3], "data": [1, 0, 1]}),
    b'{"inputs": []}',
    b"not json",
]


@pytest.mark.parametrize("body", ADMISSION_CASES, ids=range(len(ADMISSION_CASES)))
@pytest.mark.parametrize("sealer", ["keyring", "plain"])
def test_native_admission_says_and_seals_what_the_python_path_did(body: bytes,
                                                                  sealer: str) -> None:
    """The gateway's REST admission (decode, check against the model, seal the record) in one
    native call refuses with the Python check's words and class, and seals the record the
    Python path packed (max 2 rows here)."""
    ring: Keyring | PlaintextSealer = (Keyring({"k1": os.urandom(32)}, "k1")
                                       if sealer == "keyring" else PlaintextSealer())
    expected: BaseException | dict[str, np.ndarray] | None = None
    try:
        request = parse_request(body, None)
        try:
            SPEC.check_inputs(request.inputs, 2)
        except TooManyRows as exc:
            raise PayloadTooLarge(str(exc)) from None
        expected = request.inputs
    except (InvalidInput, PayloadTooLarge) as exc:
        expected = exc
    if isinstance(expected, BaseException):
        with pytest.raises(type(expected)) as refused:
            ring.seal_v2_request(body, None, NATIVE_SPEC, 2, b"aad")
        assert str(refused.value) == str(expected)
        assert type(refused.value) is type(expected)
        return
    sealed, request_id, parameters, outputs, binary, classes = ring.seal_v2_request(
        body, None, NATIVE_SPEC, 2, b"aad")
    assert (request_id, parameters, outputs, binary, classes) == (
        None, "", [("p", False)], False, [])
    _, tensors = record.unpack(ring.open(sealed, b"aad"))
    assert expected is not None and tensors.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(tensors[name], array)
        assert tensors[name].dtype == array.dtype
    if sealer == "keyring":
        with pytest.raises(IntegrityError):
            ring.open(sealed, b"other request")


@pytest.mark.parametrize("asked", [None, {"p": True}, {"k": False, "p": False},
                                   {"t": True, "k": True}])
@pytest.mark.parametrize("binary_default", [False, True])
def test_native_responses_say_what_the_python_encoder_said(
        asked: dict[str, bool] | None, binary_default: bool) -> None:
    """The answer record straight to a response body (ppml-core) against the Python
    encoder: the same document (numbers compared as JSON reads them) and binary parts."""
    from ppml_serve.codecs.v2 import InferRequest, encode_response

    outputs = {"p": np.array([[0.1, 1e-7, 3.5e12]], np.float32),
               "t": np.array([b"\xc3\xa9t\xc3\xa9", b""], dtype=object),
               "k": np.array([-3, 2**40], np.int64), "b": np.array([True, False])}
    answer = record.pack(outputs)
    request = InferRequest("r7", {}, asked, binary_default)
    want_body, want_size = encode_response("m", request, outputs, "3")
    got_body, got_size = _native.encode_v2_response(
        answer, "m", "3", "r7", list(asked.items()) if asked is not None else None,
        binary_default)
    assert got_size == want_size
    split_want, split_got = want_size or len(want_body), got_size or len(got_body)
    assert json.loads(got_body[:split_got]) == json.loads(want_body[:split_want])
    assert got_body[split_got:] == want_body[split_want:]


def test_a_bytes_output_that_is_not_text_cannot_be_json() -> None:
    answer = record.pack({"t": np.array([b"\xff"], dtype=object)})
    with pytest.raises(InvalidInput, match=r"not UTF-8 text.*binary_data = true"):
        _native.encode_v2_response(answer, "m", None, None, None, False)
    body, size = _native.encode_v2_response(answer, "m", None, None, None, True)
    assert size is not None and body[size:] == b"\x01\x00\x00\x00\xff"
    with pytest.raises(ProtocolError):
        _native.encode_v2_response(b"not a record", "m", None, None, None, False)


@pytest.mark.parametrize("body", ADMISSION_CASES[:7], ids=range(7))
def test_decoded_tensors_get_the_same_admission(body: bytes) -> None:
    """gRPC's decoded tensors go through the same native check and record as REST bodies."""
    from ppml_serve.codecs.tensors import datatype_name, tensor_bytes

    ring = Keyring({"k1": os.urandom(32)}, "k1")
    inputs = parse_request(body, None).inputs
    decoded = [(name, datatype_name(a.dtype), list(a.shape), bytes(tensor_bytes(a)))
               for name, a in inputs.items()]
    try:
        SPEC.check_inputs(inputs, 2)
    except TooManyRows as exc:
        with pytest.raises(PayloadTooLarge, match=re.escape(str(exc))):
            ring.seal_tensors(decoded, NATIVE_SPEC, 2, b"aad")
        return
    except InvalidInput as exc:
        with pytest.raises(InvalidInput) as refused:
            ring.seal_tensors(decoded, NATIVE_SPEC, 2, b"aad")
        assert str(refused.value) == str(exc) and type(refused.value) is InvalidInput
        return
    _, tensors = record.unpack(ring.open(ring.seal_tensors(decoded, NATIVE_SPEC, 2, b"aad"),
                                         b"aad"))
    for name, array in inputs.items():
        np.testing.assert_array_equal(tensors[name], array)
    plain = PlaintextSealer().seal_tensors(decoded, NATIVE_SPEC, 2, b"aad")
    assert PlaintextSealer().open(plain, b"aad") == ring.open(
        ring.seal_tensors(decoded, NATIVE_SPEC, 2, b"aad"), b"aad")
