"""The KMS contract: primary keys that wrap data keys, with ids and versions.

A wrapped data key is self-describing (it names its primary key and version), so data keys
wrapped before a rotation still unwrap after it. Implementations never put key material
or credentials into reprs, logs or exception messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class DataKey:
    """A data key in both forms; the plaintext never shows in its repr."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)
    primary_key_id: str = ""


class KMS(Protocol):
    """What ppml-serve needs from a key management service."""

    def create_primary_key(self) -> str:
        """Create a primary key; return its id."""
        ...

    def generate_data_key(self, primary_key_id: str | None = None) -> DataKey:
        """A fresh AES-256 key, plaintext and wrapped under the (default) primary key."""
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """The plaintext of a wrapped data key; ``IntegrityError`` if it was tampered with."""
        ...

    def rotate(self, primary_key_id: str | None = None) -> str:
        """New version of a primary key for new wraps; return a description of it."""
        ...
