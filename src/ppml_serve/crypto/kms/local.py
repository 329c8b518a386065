"""The embedded default KMS: versioned primary keys in a passphrase-protected file.

``primary-keys.json`` (0600) holds the primary keys encrypted with AES-256-GCM under a key
derived from a passphrase by scrypt (memory-hard: 2^15 x 8 x 128 B = 32 MiB per guess).
The passphrase comes from ``PPML_KMS_PASSPHRASE`` or a file (``security.kms_passphrase_file``).

Wrapped data key: ``b"LK1"``, key-id length byte, key id, 4-byte version, 12-byte nonce,
AES-GCM ciphertext of the data key with the header as associated data.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import SecretStr

from ppml_serve.crypto.kms.base import DataKey
from ppml_serve.errors import ConfigError, IntegrityError
from ppml_serve.private_files import read_protected, write_private

PRIMARY_FILE = "primary-keys.json"
_WRAP_MAGIC = b"LK1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _derive(passphrase: SecretStr, salt: bytes, params: dict[str, int]) -> AESGCM:
    kdf = Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"])
    return AESGCM(kdf.derive(passphrase.get_secret_value().encode()))


class LocalKMS:
    """File-backed KMS for one host (or a directory shared with the key broker)."""

    def __init__(self, directory: Path, passphrase: SecretStr) -> None:
        self._directory = directory
        path = directory / PRIMARY_FILE
        try:
            sealed = json.loads(read_protected(path))
        except FileNotFoundError:
            raise ConfigError(f"security.kms_dir: no local KMS in {directory}; "
                              "run 'ppml-serve init' or 'ppml-serve up'") from None
        except ValueError:
            raise ConfigError(f"security.kms_dir: {path} is corrupt") from None
        try:
            self._kek = _derive(passphrase, base64.b64decode(sealed["salt"]), sealed["scrypt"])
            self._keys: dict[str, Any] = json.loads(self._kek.decrypt(
                base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"]),
                b"ppml-serve primary keys"))
        except InvalidTag:
            raise ConfigError(f"security.kms_dir: wrong passphrase for {path}") from None
        except (KeyError, ValueError, TypeError):
            raise ConfigError(f"security.kms_dir: {path} is corrupt") from None
        self._salt = base64.b64decode(sealed["salt"])

    def __repr__(self) -> str:
        return f"LocalKMS({str(self._directory)!r})"

    @classmethod
    def create(cls, directory: Path, passphrase: SecretStr) -> LocalKMS:
        """A new key file holding one primary key; refuse to overwrite an existing one."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (directory / PRIMARY_FILE).exists():
            raise ConfigError(f"security.kms_dir: {directory} already holds a KMS")
        salt = secrets.token_bytes(16)
        cls._write(directory, _derive(passphrase, salt, _SCRYPT), salt,
                   {"default": None, "keys": {}})
        kms = cls(directory, passphrase)
        kms.create_primary_key()
        return kms

    @staticmethod
    def _write(directory: Path, kek: AESGCM, salt: bytes, keys: dict[str, Any]) -> None:
        nonce = secrets.token_bytes(12)
        ciphertext = kek.encrypt(nonce, json.dumps(keys).encode(), b"ppml-serve primary keys")
        document = {"format": 1, "kdf": "scrypt", "scrypt": _SCRYPT, "salt": _b64(salt),
                    "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}
        write_private(directory / PRIMARY_FILE, json.dumps(document, indent=2).encode())

    def _save(self) -> None:
        self._write(self._directory, self._kek, self._salt, self._keys)

    @property
    def default_key_id(self) -> str:
        return str(self._keys["default"])

    def describe(self) -> dict[str, Any]:
        """Key ids, versions and which is current; never key material."""
        return {key_id: {"versions": sorted(int(v) for v in entry["versions"]),
                         "current": entry["current"]}
                for key_id, entry in self._keys["keys"].items()}

    def create_primary_key(self) -> str:
        key_id = "pk-" + secrets.token_hex(6)
        self._keys["keys"][key_id] = {"current": 1, "versions": {"1": _b64(os.urandom(32))}}
        if self._keys["default"] is None:
            self._keys["default"] = key_id
        self._save()
        return key_id

    def _entry(self, primary_key_id: str | None) -> tuple[str, dict[str, Any]]:
        key_id = primary_key_id or self.default_key_id
        entry = self._keys["keys"].get(key_id)
        if entry is None:
            raise ConfigError(f"no primary key {key_id!r} in the local KMS")
        return key_id, entry

    def generate_data_key(self, primary_key_id: str | None = None) -> DataKey:
        key_id, entry = self._entry(primary_key_id)
        version = int(entry["current"])
        primary = AESGCM(base64.b64decode(entry["versions"][str(version)]))
        encoded = key_id.encode()
        header = _WRAP_MAGIC + bytes([len(encoded)]) + encoded + struct.pack(">I", version)
        nonce = secrets.token_bytes(12)
        plaintext = secrets.token_bytes(32)
        wrapped = header + nonce + primary.encrypt(nonce, plaintext, header)
        return DataKey(plaintext, wrapped, key_id)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            if wrapped[:3] != _WRAP_MAGIC:
                raise ValueError
            id_end = 4 + wrapped[3]
            key_id = wrapped[4:id_end].decode()
            (version,) = struct.unpack(">I", wrapped[id_end:id_end + 4])
            header_end = id_end + 4
            material = self._keys["keys"][key_id]["versions"][str(version)]
            primary = AESGCM(base64.b64decode(material))
            return primary.decrypt(wrapped[header_end:header_end + 12],
                                   wrapped[header_end + 12:], wrapped[:header_end])
        except (ValueError, KeyError, IndexError, struct.error, InvalidTag,
                UnicodeDecodeError):
            raise IntegrityError("wrapped data key is invalid or was tampered with") from None

    def rotate(self, primary_key_id: str | None = None) -> str:
        key_id, entry = self._entry(primary_key_id)
        version = int(entry["current"]) + 1
        entry["versions"][str(version)] = _b64(os.urandom(32))
        entry["current"] = version
        self._save()
        return f"{key_id} v{version}"
