"""Contracts of attestation providers (make evidence) and verifiers (check its signature)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ppml_serve.errors import PPMLError


class AttestationRefused(PPMLError):
    """Evidence did not satisfy the verifier or the policy; the message says why."""


@dataclass(frozen=True)
class Claims:
    """What verified evidence asserts."""

    provider: str
    measurement: str
    """The primary measurement: MRENCLAVE (SGX), MRTD (TDX), MEASUREMENT (SNP), or the
    simulated worker's code + config + model digest."""
    report_data: str
    """Hex report data: SHA-256 binding a public key (and the broker's nonce) to this
    evidence, then (hardware quotes carry 64 bytes) 32 zero bytes."""
    issued_at: float
    debug: bool
    nonce: str | None = None
    hardware_protected: bool = False
    tee: str = ""
    """sgx, tdx or snp for hardware evidence; empty for simulated and tokens."""
    measurements: Mapping[str, str] = field(default_factory=dict)
    """Typed measurements (mrenclave, mrsigner, isv_prod_id, isv_svn / mrtd, rtmr0-3 /
    measurement, host_data, tcb), hex or decimal strings."""
    tcb_status: str = ""
    """The platform's TCB status from the vendor's collateral (UpToDate, OutOfDate, ...)."""
    advisories: tuple[str, ...] = ()
    collateral_issued: str = ""
    """Issue date (ISO 8601) of the TCB info the quote was judged by."""
    collateral_sha256: str = ""
    evidence_sha256: str = ""
    test_root: bool = False
    """Verified against a TEST root, not the vendor's: no hardware protection."""

    def binds(self, public_key: bytes, nonce: str | None) -> bool:
        """Whether report_data is SHA-256(public key || nonce), then zeros (constant time)."""
        expected = report_data(public_key, nonce)
        if len(self.report_data) == 128:
            expected += "0" * 64
        return hmac.compare_digest(self.report_data.lower().encode(), expected.encode())


def evidence_document(evidence: str, kind: str) -> dict[str, object]:
    """A JSON evidence document (DCAP, SEV-SNP) as a dict; ``AttestationRefused`` if not."""
    try:
        document = json.loads(evidence)
    except (ValueError, RecursionError):
        raise AttestationRefused(f"evidence is not {kind} evidence document") from None
    if not isinstance(document, dict):
        raise AttestationRefused(f"evidence is not {kind} evidence document")
    return document


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
