"""AES-256-GCM envelopes for every record that enters the queue.

Record layout: ``b"PE"``, version byte (1), key-id length byte, key id (ASCII), 12-byte
nonce, then ciphertext and 16-byte tag. The header is authenticated together with the
caller's associated data, which binds model, request id and direction, so a record cannot
be replayed for another request or turned from a request into a reply.

Every failure to open a record raises the same opaque ``IntegrityError``, as Fernet does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from ppml_serve import _native
from ppml_serve.errors import IntegrityError

MAGIC = b"PE"
VERSION = 1
NONCE_SIZE = 12
KEY_SIZE = 32

REQUEST = "request"
REPLY = "reply"
SPEC = "spec"
"""A model's announced spec (inputs, outputs, labels): sealed like payloads."""


def associated_data(model: str, request_id: str, direction: str) -> bytes:
    """What a record is bound to; JSON keeps the fields unambiguous."""
    return json.dumps(["ppml-serve/1", model, request_id, direction]).encode()


class Sealer(Protocol):
    """Seals and opens records; implementations must authenticate ``aad``."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, record: bytes, aad: bytes) -> bytes: ...


class Keyring:
    """Data keys by id; seals under the active key, opens under any key it holds.

    Holding older keys after a rotation keeps records sealed before it readable. The
    AES-256-GCM work is ppml-core's (Rust, aws-lc), with the GIL released: the one
    implementation of the envelope that the native data plane shares.
    """

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        self._ring = _native.Keyring(dict(keys), active_key_id)
        self._ids = list(keys)

    @property
    def active_key_id(self) -> str:
        active: str = self._ring.active_key_id
        return active

    def __repr__(self) -> str:
        return f"Keyring(active={self.active_key_id!r}, key_ids=[{', '.join(self._ids)}])"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        sealed: bytes = self._ring.seal(_bytes(plaintext), aad)
        return sealed

    def open(self, record: bytes, aad: bytes) -> bytes:
        opened: bytes = self._ring.open(_bytes(record), aad)
        return opened


def _bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The native side takes ``bytes``; other buffers are copied once."""
    return data if isinstance(data, bytes) else bytes(data)


class PlaintextSealer:
    """No encryption at all. Only for measuring what encryption costs; never for real data."""

    _MARK = b"PX"

    def __repr__(self) -> str:
        return "PlaintextSealer(INSECURE)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self._MARK + plaintext

    def open(self, record: bytes, aad: bytes) -> bytes:
        if record[:2] != self._MARK:
            raise IntegrityError("record is not a plaintext record")
        return record[2:]
