"""Encrypted model files: chunked AES-256-GCM under a per-file key wrapped by the KMS.

Layout: ``b"PPMLMODEL\\0"``, version byte (1), 4-byte big-endian header length, a JSON
header, then the chunks. Header fields: ``kms_key`` (wrapped file key, base64), ``chunk_size``,
``size`` and ``sha256`` of the plaintext model, ``nonce_prefix`` (8 bytes, base64), ``cipher``.

Chunk ``i`` is sealed with nonce ``prefix || i`` (4 bytes) and associated data
``sha256(header) || i || last-flag``: chunks cannot be reordered, dropped, truncated or moved
to another file, and the header (digest included) cannot be edited. Decryption writes into
one preallocated buffer, so memory stays at about one model plus one chunk, and no plaintext
ever touches the disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.crypto.kms.base import KMS
from ppml_serve.errors import IntegrityError

MAGIC = b"PPMLMODEL\x00"
VERSION = 1
CHUNK_SIZE = 1 << 20
_TAG = 16


@dataclass(frozen=True)
class ModelHeader:
    wrapped_key: bytes = field(repr=False)
    chunk_size: int
    size: int
    sha256: str
    nonce_prefix: bytes
    raw: bytes = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What ``model inspect`` shows: never the key."""
        return {"format": f"ppml-serve encrypted model v{VERSION}", "cipher": "AES-256-GCM",
                "plaintext_size": self.size, "plaintext_sha256": self.sha256,
                "chunk_size": self.chunk_size,
                "wrapped_key_sha256": hashlib.sha256(self.wrapped_key).hexdigest()[:16]}


def is_encrypted(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def read_header(handle: BinaryIO, name: str) -> ModelHeader:
    prefix = handle.read(len(MAGIC) + 5)
    if len(prefix) < len(MAGIC) + 5 or prefix[: len(MAGIC)] != MAGIC:
        raise IntegrityError(f"{name}: not an encrypted ppml-serve model")
    if prefix[len(MAGIC)] != VERSION:
        raise IntegrityError(f"{name}: unsupported encrypted-model version {prefix[len(MAGIC)]}")
    (length,) = struct.unpack(">I", prefix[len(MAGIC) + 1:])
    raw = handle.read(length)
    try:
        document = json.loads(raw)
        return ModelHeader(base64.b64decode(document["kms_key"]), int(document["chunk_size"]),
                           int(document["size"]), str(document["sha256"]),
                           base64.b64decode(document["nonce_prefix"]), raw)
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{name}: encrypted-model header is corrupt") from None


def _aad(header: ModelHeader, index: int, last: bool) -> bytes:
    return hashlib.sha256(header.raw).digest() + struct.pack(">IB", index, last)


def encrypt_model(source: Path, target: Path, kms: KMS, primary_key_id: str | None = None,
                  chunk_size: int = CHUNK_SIZE,
                  progress: Callable[[int], None] | None = None) -> ModelHeader:
    """Stream ``source`` into an encrypted ``target``; returns the header written."""
    digest = hashlib.sha256()
    size = source.stat().st_size
    with source.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    data_key = kms.generate_data_key(primary_key_id)
    nonce_prefix = os.urandom(8)
    raw = json.dumps({"kms_key": base64.b64encode(data_key.wrapped).decode(),
                      "chunk_size": chunk_size, "size": size, "sha256": digest.hexdigest(),
                      "nonce_prefix": base64.b64encode(nonce_prefix).decode(),
                      "cipher": "AES-256-GCM"}).encode()
    header = ModelHeader(data_key.wrapped, chunk_size, size, digest.hexdigest(), nonce_prefix,
                         raw)
    with source.open("rb") as reader:
        _write_chunks(reader, target, header, AESGCM(data_key.plaintext), progress)
    return header


def encrypt_bytes(model: bytes, target: Path, kms: KMS, chunk_size: int = CHUNK_SIZE) -> None:
    """Encrypt an in-memory model straight to ``target`` (no plaintext file in between)."""
    import io

    digest = hashlib.sha256(model).hexdigest()
    data_key = kms.generate_data_key()
    nonce_prefix = os.urandom(8)
    raw = json.dumps({"kms_key": base64.b64encode(data_key.wrapped).decode(),
                      "chunk_size": chunk_size, "size": len(model), "sha256": digest,
                      "nonce_prefix": base64.b64encode(nonce_prefix).decode(),
                      "cipher": "AES-256-GCM"}).encode()
    header = ModelHeader(data_key.wrapped, chunk_size, len(model), digest, nonce_prefix, raw)
    _write_chunks(io.BytesIO(model), target, header, AESGCM(data_key.plaintext), None)


def _write_chunks(reader: BinaryIO, target: Path, header: ModelHeader, cipher: AESGCM,
                  progress: Callable[[int], None] | None) -> None:
    count = max(1, -(-header.size // header.chunk_size))
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as writer:
        writer.write(MAGIC + bytes([VERSION]) + struct.pack(">I", len(header.raw)) + header.raw)
        for index in range(count):
            chunk = reader.read(header.chunk_size)
            nonce = header.nonce_prefix + struct.pack(">I", index)
            writer.write(cipher.encrypt(nonce, chunk, _aad(header, index, index == count - 1)))
            if progress is not None:
                progress(len(chunk))
    os.replace(partial, target)


def decrypt_model(path: Path, file_key: bytes | None = None, kms: KMS | None = None,
                  progress: Callable[[int], None] | None = None) -> bytearray:
    """The plaintext model, in memory only. Give the unwrapped ``file_key`` or a ``kms``."""
    name = str(path)
    with path.open("rb") as handle:
        header = read_header(handle, name)
        if file_key is None:
            if kms is None:
                raise ValueError("decrypt_model needs file_key or kms")
            file_key = kms.unwrap(header.wrapped_key)
        cipher = AESGCM(file_key)
        plaintext = bytearray(header.size)
        count = max(1, -(-header.size // header.chunk_size))
        offset = 0
        for index in range(count):
            expected = min(header.chunk_size, header.size - offset)
            sealed = handle.read(expected + _TAG)
            nonce = header.nonce_prefix + struct.pack(">I", index)
            try:
                chunk = cipher.decrypt(nonce, sealed, _aad(header, index, index == count - 1))
            except InvalidTag:
                raise IntegrityError(
                    f"{name}: wrong key, or the file was modified (chunk {index})") from None
            plaintext[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if handle.read(1):
            raise IntegrityError(f"{name}: trailing data after the last chunk")
    if offset != header.size or hashlib.sha256(plaintext).hexdigest() != header.sha256:
        raise IntegrityError(f"{name}: decrypted model does not match its digest")
    return plaintext


def model_digest(path: Path) -> str:
    """SHA-256 of the plaintext model: from the authenticated header, or of the file."""
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) == MAGIC:
            handle.seek(0)
            return read_header(handle, str(path)).sha256
        handle.seek(0)
        digest = hashlib.sha256()
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
        return digest.hexdigest()
