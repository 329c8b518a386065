"""KMIP adapter (PyKMIP client): primary keys live in a KMIP server and never leave it.

A data key is generated locally and wrapped by the server's Encrypt operation (AES-CBC with
PKCS#5 padding under the primary key, a fresh IV each time); a SHA-256 check value inside the
wrapped plaintext detects tampering on unwrap. Rotation creates a new primary key on the
server and makes it current; the wrapped blob names its key, so older blobs still unwrap.

Wrapped key: ``b"KM1"``, id length byte, primary key uid, 16-byte IV, ciphertext.
Connection: mutual TLS 1.2 with a client certificate (the server scopes objects to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppml_serve.crypto.kms.base import DataKey
from ppml_serve.errors import ConfigError, IntegrityError, KMSUnavailable, NotReady
from ppml_serve.private_files import read_protected, write_private

_MAGIC = b"KM1"
_STATE_FILE = "kmip.json"


class KmipKMS:
    def __init__(self, host: str, port: int, cert_file: Path, key_file: Path, ca_file: Path,
                 state_dir: Path) -> None:
        from kmip import enums
        from kmip.pie.client import ProxyKmipClient
        from kmip.pie.exceptions import KmipOperationFailure

        self._enums = enums
        self._refusal: type[Exception] = KmipOperationFailure
        self._client = ProxyKmipClient(
            hostname=host, port=port, cert=str(cert_file), key=str(key_file), ca=str(ca_file),
            ssl_version="PROTOCOL_TLSv1_2", config_file="/dev/null")
        self._state_path = state_dir / _STATE_FILE
        self._state: dict[str, Any] = (json.loads(read_protected(self._state_path, secret=False))
                                       if self._state_path.exists() else {"current": None})

    def __repr__(self) -> str:
        return f"KmipKMS(current={self._state.get('current')!r})"

    @contextmanager
    def _session(self, operation: str) -> Iterator[Any]:
        try:
            self._client.open()
        except Exception as exc:  # PyKMIP raises bare Exceptions on connect failures
            raise KMSUnavailable(f"KMIP server unreachable ({type(exc).__name__})") from None
        try:
            yield self._client
        except self._refusal as exc:
            reason = getattr(exc, "reason", None)
            raise NotReady(f"KMIP {operation} failed ({reason or type(exc).__name__})") from None
        except OSError as exc:
            raise KMSUnavailable(f"KMIP connection lost during {operation} "
                                 f"({type(exc).__name__})") from None
        finally:
            self._client.close()

    def _save(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self._state_path, json.dumps(self._state).encode())

    def create_primary_key(self) -> str:
        usage = [self._enums.CryptographicUsageMask.ENCRYPT,
                 self._enums.CryptographicUsageMask.DECRYPT]
        with self._session("Create") as client:
            uid = str(client.create(self._enums.CryptographicAlgorithm.AES, 256,
                                    cryptographic_usage_mask=usage))
            client.activate(uid)
        self._state["current"] = uid
        self._save()
        return uid

    def _params(self) -> dict[str, Any]:
        return {"cryptographic_algorithm": self._enums.CryptographicAlgorithm.AES,
                "block_cipher_mode": self._enums.BlockCipherMode.CBC,
                "padding_method": self._enums.PaddingMethod.PKCS5}

    def generate_data_key(self, primary_key_id: str | None = None) -> DataKey:
        uid = primary_key_id or self._state.get("current")
        if not uid:
            raise ConfigError("security.kmip: no primary key; run 'ppml-serve init'")
        plaintext = secrets.token_bytes(32)
        check = hashlib.sha256(plaintext).digest()[:16]
        iv = os.urandom(16)
        with self._session("Encrypt") as client:
            ciphertext, _ = client.encrypt(plaintext + check, uid=uid,
                                           cryptographic_parameters=self._params(),
                                           iv_counter_nonce=iv)
        encoded = uid.encode()
        return DataKey(plaintext, _MAGIC + bytes([len(encoded)]) + encoded + iv + ciphertext, uid)

    def unwrap(self, wrapped: bytes) -> bytes:
        if wrapped[:3] != _MAGIC or len(wrapped) < 5:
            raise IntegrityError("wrapped data key is invalid or was tampered with")
        end = 4 + wrapped[3]
        uid = wrapped[4:end].decode("ascii", "replace")
        iv, ciphertext = wrapped[end:end + 16], wrapped[end + 16:]
        try:
            with self._session("Decrypt") as client:
                opened = client.decrypt(ciphertext, uid=uid,
                                        cryptographic_parameters=self._params(),
                                        iv_counter_nonce=iv)
        except KMSUnavailable:
            raise  # an outage is not a verdict on the key: the caller retries
        except NotReady:  # the server refused to decrypt it
            raise IntegrityError("wrapped data key is invalid or was tampered with") from None
        plaintext, check = bytes(opened[:32]), bytes(opened[32:])
        if len(plaintext) != 32 or hashlib.sha256(plaintext).digest()[:16] != check:
            raise IntegrityError("wrapped data key is invalid or was tampered with")
        return plaintext

    def rotate(self, primary_key_id: str | None = None) -> str:
        previous = self._state.get("current")
        uid = self.create_primary_key()
        self._state.setdefault("previous", []).append(previous)
        self._save()
        return f"KMIP primary key {uid} is current (was {previous}; still used to unwrap)"
