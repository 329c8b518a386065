"""API-key authentication, per-model authorization and scopes.

Keys are random 256-bit tokens, so a plain SHA-256 is a safe way to store them (no password
stretching needed); hashes are compared in constant time.

``api-keys.json``::

    {"keys": [{"id": "<12 hex>", "name": "...", "sha256": "<hex>", "models": ["*"],
               "scopes": ["infer", "metrics"]}]}

Names and ids are unique; jobs belong to the key id. The gateway re-reads the file when it
changes, so keys can be added and revoked without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml_serve.errors import ConfigError, Forbidden, Unauthorized
from ppml_serve.private_files import read_protected, write_private

log = logging.getLogger("ppml_serve.gateway")
audit = logging.getLogger("ppml_serve.audit")

TOKEN_PREFIX = "ppml_"  # noqa: S105 - a marker that makes leaked keys easy to scan for
SCOPES = ("infer", "metrics", "admin")
"""``infer``: the inference API for the key's models; ``metrics``: read ``/metrics``;
``admin``: the model repository API."""
RELOAD_CHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    models: frozenset[str]
    scopes: frozenset[str] = frozenset({"infer"})

    def authorize(self, model: str) -> None:
        if "infer" not in self.scopes:
            raise Forbidden("this API key may not call the inference API")
        if "*" not in self.models and model not in self.models:
            raise Forbidden("this API key may not use this model")

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope")


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    principal: Principal


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(read_protected(path, secret=False))
        keys = document["keys"]
        if not isinstance(keys, list):
            raise TypeError
    except FileNotFoundError:
        raise ConfigError(f"gateway.api_keys_file: no such file: {path}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"gateway.api_keys_file: {path} is not a valid key file") from None
    for item in keys:  # older files had no ids or scopes
        if isinstance(item, dict):
            item.setdefault("id", str(item.get("sha256", ""))[:12])
            item.setdefault("scopes", ["infer"])
    return keys


def _parse(path: Path) -> list[_StoredKey]:
    try:
        entries = [
            _StoredKey(bytes.fromhex(item["sha256"]),
                       Principal(str(item["id"]), str(item.get("name", "key")),
                                 frozenset(item.get("models", ["*"])),
                                 frozenset(item["scopes"])))
            for item in _read(path)
        ]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"gateway.api_keys_file: {path} is not a valid key file") from None
    if any(len(entry.digest) != 32 for entry in entries):
        raise ConfigError(f"gateway.api_keys_file: {path} holds a malformed sha256")
    ids = [entry.principal.key_id for entry in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"gateway.api_keys_file: {path} holds two keys with one id")
    return entries


def _audit_changes(before: list[_StoredKey], after: list[_StoredKey]) -> None:
    """What a reload changed, in this service's audit log: keys are added and revoked by
    other processes (the CLI, an operator's edit), whose own records this log cannot see."""
    old = {entry.principal.key_id: entry for entry in before}
    new = {entry.principal.key_id: entry for entry in after}

    def described(principal: Principal) -> str:
        return (f"name={principal.name!r} id={principal.key_id} "
                f"models={','.join(sorted(principal.models))} "
                f"scopes={','.join(sorted(principal.scopes))}")

    for key_id in sorted(new.keys() - old.keys()):
        audit.info("API key in force: %s", described(new[key_id].principal))
    for key_id in sorted(old.keys() - new.keys()):
        audit.info("API key revoked: %s", described(old[key_id].principal))
    for key_id in sorted(old.keys() & new.keys()):
        if old[key_id] != new[key_id]:
            audit.info("API key changed: %s", described(new[key_id].principal))


class ApiKeyStore:
    """The keys of ``path``, re-read (at most once a second) when the file changes; a
    broken new version is refused with an error in the log and the previous keys stay."""

    def __init__(self, entries: list[_StoredKey], path: Path | None = None) -> None:
        self._entries = entries
        self._path = path
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def __repr__(self) -> str:
        return f"ApiKeyStore({len(self._entries)} keys)"

    @classmethod
    def load(cls, path: Path) -> ApiKeyStore:
        return cls(_parse(path), path)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return
        self._stamp = stamp
        try:
            entries = _parse(self._path)
        except ConfigError as exc:
            log.error("API keys not reloaded, keeping the previous ones: %s", exc)
            return
        _audit_changes(self._entries, entries)
        self._entries = entries
        log.info("API keys reloaded (%d keys)", len(self._entries))

    def front_callers(self) -> list[tuple[bytes, str, list[str] | None, str, bool]]:
        """Every key, for the native front's inference path: (SHA-256 of the token, key
        name, models or ``None`` for all, key id: a job's owner, whether it holds the
        ``infer`` scope); the front refuses the rest 401 and those that may not call the
        model 403, as ``authenticate`` and ``authorize`` do. Reloads the file first, as a
        request does, so a revoked key leaves the front within the reload interval."""
        self._maybe_reload()
        return [(entry.digest, entry.principal.name,
                 None if "*" in entry.principal.models else sorted(entry.principal.models),
                 entry.principal.key_id, "infer" in entry.principal.scopes)
                for entry in self._entries]

    def authenticate(self, authorization: str | None) -> Principal:
        self._maybe_reload()
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # RFC 7235: scheme is caseless
            raise Unauthorized("missing or invalid API key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: Principal | None = None
        for entry in self._entries:  # check every entry: timing must not tell which matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise Unauthorized("missing or invalid API key")
        return found


def _write(path: Path, keys: list[dict[str, Any]]) -> None:
    write_private(path, json.dumps({"keys": keys}, indent=2).encode())


def add_api_key(path: Path, name: str, models: list[str],
                scopes: tuple[str, ...] = ("infer",)) -> str:
    """Create a key, store only its hash in ``path``, and return the token (shown once)."""
    if not path.parent.is_dir():
        raise ConfigError(f"no state directory at {path.parent}; run 'ppml-serve init' first")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ConfigError(f"--scopes: unknown scope(s) {unknown}; choose from {list(SCOPES)}")
    keys = _read(path) if path.exists() else []
    if any(item.get("name") == name for item in keys):
        raise ConfigError(f"an API key named {name!r} exists; pick another name or revoke it "
                          "first ('ppml-serve keys revoke')")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    taken = {item.get("id") for item in keys}
    key_id = secrets.token_hex(6)
    while key_id in taken:
        key_id = secrets.token_hex(6)
    keys.append({"id": key_id, "name": name, "sha256": hash_key(token), "models": models,
                 "scopes": list(scopes)})
    _write(path, keys)
    audit.info("API key added: name=%r id=%s models=%s scopes=%s", name, key_id,
               ",".join(models), ",".join(scopes))
    return token


def list_api_keys(path: Path) -> list[dict[str, Any]]:
    """Id, name, models and scopes of every key (never the hash)."""
    return [{"id": item["id"], "name": item.get("name"), "models": item.get("models", ["*"]),
             "scopes": item["scopes"]} for item in _read(path)]


def revoke_api_key(path: Path, name_or_id: str) -> dict[str, Any]:
    """Remove the key with this name or id; running gateways stop accepting it within a
    second or two."""
    keys = _read(path)
    matches = [item for item in keys if name_or_id in (item.get("name"), item.get("id"))]
    if not matches:
        raise ConfigError(f"no API key named or with id {name_or_id!r} in {path}")
    _write(path, [item for item in keys if item not in matches])
    audit.info("API key revoked: name=%r id=%s", matches[0].get("name"), matches[0]["id"])
    return {"id": matches[0]["id"], "name": matches[0].get("name")}


def metrics_authorizer(api_keys_file: Path) -> Callable[[str | None], tuple[int, str] | None]:
    """The gateway's rule for ``/metrics`` as a check of an Authorization header, for other
    metrics endpoints (a worker's): ``None`` for a key with the ``metrics`` scope, else the
    refusal's status and words."""
    keys = ApiKeyStore.load(api_keys_file)

    def authorize(header: str | None) -> tuple[int, str] | None:
        try:
            keys.authenticate(header).require("metrics")
        except Unauthorized as exc:
            return 401, str(exc)
        except Forbidden as exc:
            return 403, str(exc)
        return None

    return authorize
