"""End-to-end sealed inference: the client seals to the workers' attested X25519 key.

Request blob: client ephemeral public key (32) || nonce (12) || AES-GCM(sent-at time in
milliseconds (8, big-endian) || input record). Both directions' keys come from one ECDH +
HKDF; the answer is sealed with the second key, so only the client that made the request can
read it. The model name is associated data, so a sealed input cannot be replayed against
another model; the authenticated time bounds when it may be answered at all, and workers
remember each blob's id (``replay_id``) for that window in Redis, so a repeat of the same blob
(through any gateway, to any worker) is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.crypto.sealed_box import derive_keys, public_bytes
from ppml_serve.errors import IntegrityError, InvalidInput

E2E_INFO = b"ppml-serve e2e v2"
WINDOW_S = 120.0
"""A sealed request is answered only this close to the time it says it was sealed."""


class ClientSession:
    """One request's keys on the client side."""

    def __init__(self, worker_public: bytes) -> None:
        ephemeral = X25519PrivateKey.generate()
        self._public = public_bytes(ephemeral)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(worker_public))
        self._forward, self._back = derive_keys(shared, self._public, worker_public, E2E_INFO)

    def __repr__(self) -> str:
        return "ClientSession()"

    def seal_request(self, plaintext: bytes, model: str) -> bytes:
        nonce = os.urandom(12)
        sent_at = struct.pack(">Q", int(time.time() * 1000))
        return self._public + nonce + self._forward.encrypt(nonce, sent_at + plaintext,
                                                            model.encode())

    def open_reply(self, blob: bytes, model: str) -> bytes:
        try:
            return self._back.decrypt(blob[:12], blob[12:], model.encode())
        except (InvalidTag, ValueError):
            raise IntegrityError("sealed answer failed authentication") from None


@dataclass(frozen=True)
class OpenedRequest:
    plaintext: bytes
    reply_key: AESGCM
    replay_id: str
    """Hex digest naming this exact blob (its ephemeral key and nonce)."""


class WorkerKey:
    """The worker side: opens sealed requests and seals their answers."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key
        self.public = public_bytes(private_key)

    def __repr__(self) -> str:
        return "WorkerKey()"

    def open_request(self, blob: bytes, model: str, now: float | None = None) -> OpenedRequest:
        if len(blob) < 32 + 12 + 8 + 16:
            raise IntegrityError("sealed request is too short")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
            forward, back = derive_keys(shared, blob[:32], self.public, E2E_INFO)
            inner = forward.decrypt(blob[32:44], blob[44:], model.encode())
        except (InvalidTag, ValueError):
            raise IntegrityError("sealed request failed authentication") from None
        (sent_ms,) = struct.unpack(">Q", inner[:8])
        age = (time.time() if now is None else now) - sent_ms / 1000
        if abs(age) > WINDOW_S:
            raise InvalidInput(f"the sealed request is {age:.0f} s old, outside its "
                                 f"{WINDOW_S:.0f} s window (replayed, or the client's clock "
                                 "is wrong)")
        return OpenedRequest(inner[8:], back, hashlib.sha256(blob[:44]).hexdigest())

    @staticmethod
    def seal_reply(back: AESGCM, plaintext: bytes, model: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + back.encrypt(nonce, plaintext, model.encode())
