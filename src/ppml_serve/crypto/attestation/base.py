"""Contracts of attestation providers (make evidence) and verifiers (check its signature)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from ppml_serve.errors import PPMLError


class AttestationRefused(PPMLError):
    """Evidence did not satisfy the verifier or the policy; the message says why."""


@dataclass(frozen=True)
class Claims:
    """What verified evidence asserts."""

    provider: str
    measurement: str
    report_data: str
    """Hex SHA-256 binding a public key (and the broker's nonce) to this evidence."""
    issued_at: float
    debug: bool
    nonce: str | None = None
    hardware_protected: bool = False


def report_data(public_key: bytes, nonce: str | None) -> str:
    return hashlib.sha256(public_key + (nonce or "").encode()).hexdigest()


class Provider(Protocol):
    """Runs beside the worker: produces evidence for ``report_data``."""

    name: str

    def evidence(self, measurement: str, report_data: str, nonce: str | None) -> str: ...


class Verifier(Protocol):
    """Runs in the key broker or client: checks evidence and returns its claims."""

    name: str

    def verify(self, evidence: str) -> Claims: ...
