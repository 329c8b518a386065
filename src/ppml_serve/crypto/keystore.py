"""The table of record data keys (``data-keys.json``): wrapped forms only, never plaintext.

``{"active": ID, "keys": {ID: {"wrapped": B64, "created": ISO-8601}}}``. Rotation adds a key
and makes it active; older keys stay so that records sealed under them still open.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from ppml_serve.crypto.envelope import Keyring
from ppml_serve.crypto.kms.base import KMS
from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected, write_private

DATA_KEYS_FILE = "data-keys.json"


class DataKeyTable:
    def __init__(self, path: Path, active: str, wrapped: dict[str, bytes]) -> None:
        self.path = path
        self.active = active
        self.wrapped = wrapped

    def __repr__(self) -> str:
        return f"DataKeyTable(active={self.active!r}, keys={len(self.wrapped)})"

    @classmethod
    def load(cls, path: Path) -> DataKeyTable:
        try:
            document = json.loads(read_protected(path, secret=False))
            wrapped = {key_id: base64.b64decode(entry["wrapped"])
                       for key_id, entry in document["keys"].items()}
            return cls(path, str(document["active"]), wrapped)
        except FileNotFoundError:
            raise ConfigError(f"security.kms_dir: no data keys in {path}; "
                              "run 'ppml-serve init'") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"security.kms_dir: {path} is corrupt") from None

    @classmethod
    def create(cls, path: Path, kms: KMS) -> DataKeyTable:
        table = cls(path, "", {})
        table.rotate(kms)
        return table

    def rotate(self, kms: KMS) -> str:
        key = kms.generate_data_key()
        key_id = "dk-" + hashlib.sha256(key.wrapped).hexdigest()[:16]
        self.wrapped[key_id] = key.wrapped
        self.active = key_id
        self._save()
        return key_id

    def _save(self) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        document = {"active": self.active,
                    "keys": {key_id: {"wrapped": base64.b64encode(blob).decode(), "created": now}
                             for key_id, blob in self.wrapped.items()}}
        write_private(self.path, json.dumps(document, indent=2).encode())

    def unwrap_all(self, kms: KMS) -> dict[str, bytes]:
        return {key_id: kms.unwrap(blob) for key_id, blob in self.wrapped.items()}

    def keyring(self, kms: KMS) -> Keyring:
        return Keyring(self.unwrap_all(kms), self.active)
