"""The wire contract from both sides: records sealed or framed by the Python implementation
that wrote the queue before ppml-core (the envelope with ``cryptography``'s AES-GCM, the
framing in pure Python) open and parse in the native code, and the other way round; the same
refusals, with the same words. The reference implementations below are the old code, kept
here as the contract's second reader."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from ppml_serve.codecs import record
from ppml_serve.crypto.envelope import Keyring
from ppml_serve.errors import (
    IntegrityError,
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
