"""AES-256-GCM envelopes for every record that enters the queue.

Record layout: ``b"PE"``, version byte (1), key-id length byte, key id (ASCII), 12-byte
nonce, then ciphertext and 16-byte tag. The header is authenticated together with the
caller's associated data, which binds model, request id and direction, so a record cannot
be replayed for another request or turned from a request into a reply.

Every failure to open a record raises the same opaque ``IntegrityError``, as Fernet does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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

    Holding older keys after a rotation keeps records sealed before it readable.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_key_id: str,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if active_key_id not in keys:
            raise ValueError("the active key id is not among the keys")
        self._ciphers: dict[bytes, AESGCM] = {}
        for key_id, key in keys.items():
            encoded = key_id.encode("ascii")
            if not 0 < len(encoded) < 256:
                raise ValueError("a key id must be 1-255 ASCII characters")
            if len(key) != KEY_SIZE:
                raise ValueError("data keys must be 256-bit")
            self._ciphers[encoded] = AESGCM(key)
        self._active = active_key_id.encode("ascii")
        self._random = random_bytes

    @property
    def active_key_id(self) -> str:
        return self._active.decode()

    def __repr__(self) -> str:
        ids = ", ".join(key_id.decode() for key_id in self._ciphers)
        return f"Keyring(active={self.active_key_id!r}, key_ids=[{ids}])"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = self._random(NONCE_SIZE)
        header = b"%s%c%c%s%s" % (MAGIC, VERSION, len(self._active), self._active, nonce)
        return header + self._ciphers[self._active].encrypt(nonce, plaintext, header + aad)

    def open(self, record: bytes, aad: bytes) -> bytes:
        if len(record) < 4 or record[:2] != MAGIC or record[2] != VERSION:
            raise IntegrityError("record is not a ppml-serve envelope")
        id_end = 4 + record[3]
        header_end = id_end + NONCE_SIZE
        cipher = self._ciphers.get(record[4:id_end])
        if cipher is None or len(record) < header_end + 16:
            raise IntegrityError("record failed authentication")
        view = memoryview(record)  # slices of a view copy nothing
        try:
            return cipher.decrypt(view[id_end:header_end], view[header_end:],
                                  bytes(view[:header_end]) + aad)
        except InvalidTag:
            raise IntegrityError("record failed authentication") from None


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
