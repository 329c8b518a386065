"""API-key authentication and per-model authorization.

Keys are random 256-bit tokens, so a plain SHA-256 is a safe way to store them (no password
stretching needed); hashes are compared in constant time.

``api-keys.json``: ``{"keys": [{"name": "...", "sha256": "<hex>", "models": ["*"]}]}``
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from ppml_serve.crypto.kms.local import write_private
from ppml_serve.errors import ConfigError, Forbidden, Unauthorized

TOKEN_PREFIX = "ppml_"  # noqa: S105 - a marker that makes leaked keys easy to scan for


@dataclass(frozen=True)
class Principal:
    name: str
    models: frozenset[str]

    def authorize(self, model: str) -> None:
        if "*" not in self.models and model not in self.models:
            raise Forbidden("this API key may not use this model")


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    principal: Principal


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeyStore:
    def __init__(self, entries: list[_StoredKey]) -> None:
        self._entries = entries

    def __repr__(self) -> str:
        return f"ApiKeyStore({len(self._entries)} keys)"

    @classmethod
    def load(cls, path: Path) -> ApiKeyStore:
        try:
            document = json.loads(path.read_text())
            entries = [
                _StoredKey(bytes.fromhex(item["sha256"]),
                           Principal(str(item.get("name", "key")),
                                     frozenset(item.get("models", ["*"]))))
                for item in document["keys"]
            ]
        except FileNotFoundError:
            raise ConfigError(f"gateway.api_keys_file: no such file: {path}") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"gateway.api_keys_file: {path} is not a valid key file") from None
        if any(len(entry.digest) != 32 for entry in entries):
            raise ConfigError(f"gateway.api_keys_file: {path} holds a malformed sha256")
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing or invalid API key")
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: Principal | None = None
        for entry in self._entries:  # check every entry: timing must not tell which matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise Unauthorized("missing or invalid API key")
        return found


def add_api_key(path: Path, name: str, models: list[str]) -> str:
    """Create a key, store only its hash in ``path``, and return the token (shown once)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    document: dict[str, list[dict[str, object]]] = {"keys": []}
    if path.exists():
        document = json.loads(path.read_text())
    document["keys"].append({"name": name, "sha256": hash_key(token), "models": models})
    write_private(path, json.dumps(document, indent=2).encode())
    return token
