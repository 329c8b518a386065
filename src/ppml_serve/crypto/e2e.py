"""End-to-end sealed inference: the client seals to the workers' attested X25519 key.

Request blob: client ephemeral public key (32) || nonce (12) || AES-GCM(input record).
Both directions' keys come from one ECDH + HKDF; the answer is sealed with the
second key, so only the client that made the request can read it. The model name is
associated data, so a sealed input cannot be replayed against another model.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.crypto.sealed_box import derive_keys, public_bytes
from ppml_serve.errors import IntegrityError

E2E_INFO = b"ppml-serve e2e v1"


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
        return self._public + nonce + self._forward.encrypt(nonce, plaintext, model.encode())

    def open_reply(self, blob: bytes, model: str) -> bytes:
        try:
            return self._back.decrypt(blob[:12], blob[12:], model.encode())
        except (InvalidTag, ValueError):
            raise IntegrityError("sealed answer failed authentication") from None


class WorkerKey:
    """The worker side: opens sealed requests and seals their answers."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key
        self.public = public_bytes(private_key)

    def __repr__(self) -> str:
        return "WorkerKey()"

    def open_request(self, blob: bytes, model: str) -> tuple[bytes, AESGCM]:
        if len(blob) < 32 + 12 + 16:
            raise IntegrityError("sealed request is too short")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
            forward, back = derive_keys(shared, blob[:32], self.public, E2E_INFO)
            return forward.decrypt(blob[32:44], blob[44:], model.encode()), back
        except (InvalidTag, ValueError):
            raise IntegrityError("sealed request failed authentication") from None

    @staticmethod
    def seal_reply(back: AESGCM, plaintext: bytes, model: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + back.encrypt(nonce, plaintext, model.encode())
