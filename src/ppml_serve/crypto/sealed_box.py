"""Sealing to an X25519 public key: ephemeral ECDH + HKDF-SHA256 + AES-256-GCM.

Used for key release (broker -> attested worker) and for end-to-end sealed inference
(client -> attested worker and back). Blob: ephemeral public key (32) || nonce (12) || ct.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml_serve.errors import IntegrityError

RAW = serialization.Encoding.Raw
PUBLIC_RAW = serialization.PublicFormat.Raw


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(RAW, PUBLIC_RAW)


def derive_keys(shared: bytes, sender_public: bytes, recipient_public: bytes,
                info: bytes) -> tuple[AESGCM, AESGCM]:
    """Two keys from one exchange: sender->recipient and recipient->sender."""
    material = HKDF(hashes.SHA256(), 64, salt=None,
                    info=info + sender_public + recipient_public).derive(shared)
    return AESGCM(material[:32]), AESGCM(material[32:])


def seal_to(recipient_public: bytes, plaintext: bytes, info: bytes) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    sender_public = public_bytes(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    forward, _ = derive_keys(shared, sender_public, recipient_public, info)
    nonce = os.urandom(12)
    return sender_public + nonce + forward.encrypt(nonce, plaintext, info)


def open_sealed(recipient: X25519PrivateKey, blob: bytes, info: bytes) -> bytes:
    if len(blob) < 32 + 12 + 16:
        raise IntegrityError("sealed box is too short")
    try:
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
    except ValueError:
        raise IntegrityError("sealed box has an invalid public key") from None
    forward, _ = derive_keys(shared, blob[:32], public_bytes(recipient), info)
    try:
        return forward.decrypt(blob[32:44], blob[44:], info)
    except InvalidTag:
        raise IntegrityError("sealed box failed authentication") from None
