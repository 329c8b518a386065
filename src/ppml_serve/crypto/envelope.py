"""AES-256-GCM envelopes for every record that enters the queue.

Record layout: ``b"PE"``, version byte (1), key-id length byte, key id (ASCII), 12-byte
nonce, then ciphertext and 16-byte tag. The header is authenticated together with the
caller's associated data, which binds model, request id and direction, so a record cannot
be replayed for another request or turned from a request into a reply.

Every failure to open a record raises the same opaque ``IntegrityError``, as Fernet does.

Records are sealed under per-model keys, derived from the KMS-wrapped record keys with
HKDF-SHA256 and the model's name (``model_keys``): the gateway, which holds the record keys,
derives each model's; the key broker releases to a worker only the keys of the model its
attestation was bound to, so a worker attested for one model cannot open another's records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml_serve import _native
from ppml_serve.errors import IntegrityError

if TYPE_CHECKING:
    from ppml_serve._native import BatchLayout, OpenedBatch

MAGIC = b"PE"
VERSION = 1
NONCE_SIZE = 12
KEY_SIZE = 32

REQUEST = "request"
REPLY = "reply"
SPEC = "spec"
"""A model's announced spec (inputs, outputs, labels): sealed like payloads."""


def associated_data(model: str, request_id: str, direction: str) -> bytes:
    """What a record is bound to; JSON keeps the fields unambiguous."""
    return json.dumps(["ppml-serve/1", model, request_id, direction]).encode()


MODEL_KEY_INFO = b"ppml-serve record key v1\0"


def model_keys(keys: Mapping[str, bytes], model: str) -> dict[str, bytes]:
    """Each record key's derivation for ``model`` (same key ids: a rotation stays readable)."""
    def derive(key: bytes) -> bytes:
        return HKDF(hashes.SHA256(), KEY_SIZE, salt=None,
                    info=MODEL_KEY_INFO + model.encode()).derive(key)
    return {key_id: derive(key) for key_id, key in keys.items()}


class Sealer(Protocol):
    """Seals and opens records; implementations must authenticate ``aad``."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, record: bytes, aad: bytes) -> bytes: ...

    def open_batch(self, records: list[bytes], aads: list[bytes], layout: BatchLayout,
                   max_rows: int) -> OpenedBatch:
        """Open many records at once and stack the rows of the tensor records that fit
        ``layout`` (``ppml_serve._native``'s ``open_batch``: one call, GIL released)."""


class ModelSealers(Protocol):
    """The gateway's sealers: one per model (name, without version)."""

    def for_model(self, model: str) -> Sealer: ...


class Keyring:
    """Data keys by id; seals under the active key, opens under any key it holds.

    Holding older keys after a rotation keeps records sealed before it readable. The
    AES-256-GCM work is ppml-core's (Rust, aws-lc), with the GIL released: the one
    implementation of the envelope that the native data plane shares.
    """

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        self._ring = _native.Keyring(dict(keys), active_key_id)
        self._ids = list(keys)
        self._keys = dict(keys)
        self._models: dict[str, Keyring] = {}

    def for_model(self, model: str) -> Keyring:
        """The keyring of ``model``'s derived keys (what the broker releases for it)."""
        ring = self._models.get(model)
        if ring is None:
            ring = self._models[model] = Keyring(model_keys(self._keys, model),
                                                 self.active_key_id)
        return ring

    @property
    def active_key_id(self) -> str:
        active: str = self._ring.active_key_id
        return active

    @property
    def native(self) -> _native.Keyring:
        """The ppml-core keyring itself, shared with the native front's inference path."""
        return self._ring

    def __repr__(self) -> str:
        return f"Keyring(active={self.active_key_id!r}, key_ids=[{', '.join(self._ids)}])"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        sealed: bytes = self._ring.seal(_bytes(plaintext), aad)
        return sealed

    def open(self, record: bytes, aad: bytes) -> bytes:
        opened: bytes = self._ring.open(_bytes(record), aad)
        return opened

    def open_batch(self, records: list[bytes], aads: list[bytes], layout: BatchLayout,
                   max_rows: int) -> OpenedBatch:
        return self._ring.open_batch(records, aads, layout, max_rows)

def _bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The native side takes ``bytes``; other buffers are copied once."""
    return data if isinstance(data, bytes) else bytes(data)


class PlaintextSealer:
    """No encryption at all. Only for measuring what encryption costs; never for real data."""

    _MARK = b"PX"

    def __repr__(self) -> str:
        return "PlaintextSealer(INSECURE)"

    def for_model(self, model: str) -> PlaintextSealer:
        return self

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self._MARK + plaintext

    def open(self, record: bytes, aad: bytes) -> bytes:
        if record[:2] != self._MARK:
            raise IntegrityError("record is not a plaintext record")
        return record[2:]

    def open_batch(self, records: list[bytes], aads: list[bytes], layout: BatchLayout,
                   max_rows: int) -> OpenedBatch:
        # the same stacking as sealed records get, so that plain vs secure compares crypto
        marked = [record[:2] == self._MARK for record in records]
        columns, rows, fates = _native.stack_batch(
            [record[2:] if ok else b"" for record, ok in zip(records, marked, strict=True)],
            layout, max_rows)
        return columns, rows, [
            fate if ok else ("refused", IntegrityError("record is not a plaintext record"))
            for fate, ok in zip(fates, marked, strict=True)]
