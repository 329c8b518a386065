"""The embedded default KMS: a primary key file wrapping AES-256 data keys.

Directory layout (every file mode 0600)::

    primary.key      32 random bytes: the primary (key-encryption) key
    data-keys.json   {"active": ID, "keys": {ID: {"wrapped": B64, "created": ISO-8601}}}

A data key is wrapped with AES-256-GCM under the primary key, with its id as associated
data, so a wrapped key cannot be swapped under another id.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.crypto.envelope import KEY_SIZE, Keyring
from ppml_serve.errors import ConfigError, IntegrityError

PRIMARY_FILE = "primary.key"
DATA_KEYS_FILE = "data-keys.json"


@dataclass(frozen=True)
class DataKey:
    """A data key in both forms; the plaintext never shows in its repr."""

    key_id: str
    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable only by its owner, atomically."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


class LocalKMS:
    """File-backed KMS for one host (or a directory shared with the workers)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        try:
            primary = (directory / PRIMARY_FILE).read_bytes()
            self._table: dict[str, Any] = json.loads((directory / DATA_KEYS_FILE).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"security.kms_dir: no local KMS in {directory}; "
                "run 'ppml-serve keys init' or 'ppml-serve up'"
            ) from None
        except ValueError:
            raise ConfigError(
                f"security.kms_dir: {directory / DATA_KEYS_FILE} is corrupt") from None
        if len(primary) != KEY_SIZE:
            raise ConfigError(f"security.kms_dir: {directory / PRIMARY_FILE} is not a 256-bit key")
        self._primary = AESGCM(primary)

    def __repr__(self) -> str:
        return f"LocalKMS({str(self._directory)!r})"

    @classmethod
    def create(cls, directory: Path) -> LocalKMS:
        """Make a new primary key and a first data key; refuse to overwrite existing ones."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (directory / PRIMARY_FILE).exists():
            raise ConfigError(f"security.kms_dir: {directory} already holds a KMS")
        write_private(directory / PRIMARY_FILE, secrets.token_bytes(KEY_SIZE))
        write_private(directory / DATA_KEYS_FILE, b'{"active": null, "keys": {}}')
        kms = cls(directory)
        kms.rotate()
        return kms

    @classmethod
    def open_or_create(cls, directory: Path) -> LocalKMS:
        if (directory / PRIMARY_FILE).exists():
            return cls(directory)
        return cls.create(directory)

    @property
    def active_key_id(self) -> str:
        return str(self._table["active"])

    @property
    def key_ids(self) -> list[str]:
        return list(self._table["keys"])

    def generate_data_key(self) -> DataKey:
        key_id = "dk-" + secrets.token_hex(8)
        plaintext = secrets.token_bytes(KEY_SIZE)
        nonce = secrets.token_bytes(12)
        wrapped = nonce + self._primary.encrypt(nonce, plaintext, key_id.encode())
        return DataKey(key_id, plaintext, wrapped)

    def unwrap(self, key_id: str) -> bytes:
        entry = self._table["keys"].get(key_id)
        if entry is None:
            raise IntegrityError(f"unknown data key id {key_id!r}")
        wrapped = base64.b64decode(entry["wrapped"])
        try:
            return self._primary.decrypt(wrapped[:12], wrapped[12:], key_id.encode())
        except InvalidTag:
            raise IntegrityError(f"data key {key_id!r} failed to unwrap") from None

    def rotate(self) -> str:
        """Add a new data key and make it the active one; older keys stay for opening."""
        key = self.generate_data_key()
        self._table["keys"][key.key_id] = {
            "wrapped": base64.b64encode(key.wrapped).decode(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._table["active"] = key.key_id
        write_private(self._directory / DATA_KEYS_FILE, json.dumps(self._table, indent=2).encode())
        return key.key_id

    def keyring(self) -> Keyring:
        """Every data key, unwrapped, with the active one for sealing."""
        return Keyring({key_id: self.unwrap(key_id) for key_id in self.key_ids},
                       self.active_key_id)
