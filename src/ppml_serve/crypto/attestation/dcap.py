"""Verifier of Intel DCAP quotes (SGX and TDX) on ``dcap-qvl``, fully offline.

``dcap-qvl`` checks the quote's signature by the attestation key, the QE report that binds
that key, the PCK certificate chain up to Intel's SGX Root CA (pinned inside the library; a
root carried in the quote is ignored), the CRLs, and the signed TCB info and QE identity, at
the time it is given. It returns the platform's TCB status and advisories; what is acceptable
is the policy's decision (``Policy.check_tcb``).

Evidence is JSON: ``{"quote": base64, "collateral": {...}}``. The collateral is signed by
Intel, so it may come from the worker; without it the broker's collateral cache is used.

A test root (``keybroker.dcap_test_root_file``) replaces Intel's root for development stacks
whose quotes come from ``test_pki``: their claims say ``hardware_protected: false`` and
``test_root: true``, which a policy refuses unless it sets ``allow_test_root``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import struct
import time
from collections.abc import Callable
from typing import Any

import dcap_qvl
from cryptography import x509

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims
from ppml_serve.crypto.attestation.base import evidence_document as parse_evidence
from ppml_serve.crypto.attestation.collateral import CollateralStore

NAME = "dcap"
MAX_QUOTE_BYTES = 64 * 1024
SGX_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1
TDX_DEBUG = 0x01  # TD_ATTRIBUTES bit 0 (TUD.DEBUG)
TEE_TDX = 0x81


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationRefused(f"evidence {what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationRefused(f"evidence {what} is not base64") from None


def evidence_document(quote: bytes, collateral: dict[str, Any] | None) -> str:
    return json.dumps({"quote": base64.b64encode(quote).decode(), "collateral": collateral})


_CRL_EXPIRED = re.compile(r"CrlExpired \{.*next_update: UnixTime\((\d+)\)")


def _reason(exc: Exception) -> str:
    """dcap-qvl's own first line ("TCBInfo expired", "ISV enclave report signature is
    invalid", ...), without its "Verification failed:" prefix; an expired CRL in words."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    expired = _CRL_EXPIRED.search(text)
    if expired:
        when = dt.datetime.fromtimestamp(int(expired.group(1)), dt.timezone.utc)
        return (f"the collateral expired (its CRL's next update was {when:%Y-%m-%d %H:%M} UTC):"
                " fetch fresh collateral")
    return text.removeprefix("Verification failed: ")[:200]


def _from_test_pki(quote: bytes) -> bool:
    try:
        chain = dcap_qvl.parse_quote(quote).cert_chain_pem_bytes() or b""
    except ValueError:
        return False
    return b"ppml-serve TEST" in b"".join(
        cert.subject.public_bytes() for cert in x509.load_pem_x509_certificates(chain)) \
        if chain else False


def quote_measurements(quote: bytes) -> tuple[str, dict[str, str], bytes, bool]:
    """TEE kind, typed measurements, report_data and the debug flag, read (not verified)."""
    try:
        parsed = dcap_qvl.parse_quote(quote)
    except ValueError as exc:
        raise AttestationRefused(f"not a DCAP quote ({_reason(exc)})") from None
    report = parsed.report
    if parsed.header.tee_type == TEE_TDX:
        values = {"mrtd": report.mr_td.hex(), "rtmr0": report.rt_mr0.hex(),
                  "rtmr1": report.rt_mr1.hex(), "rtmr2": report.rt_mr2.hex(),
                  "rtmr3": report.rt_mr3.hex(), "mrconfigid": report.mr_config_id.hex()}
        return "tdx", values, bytes(report.report_data), bool(report.td_attributes[0] & TDX_DEBUG)
    # The SGX report body starts after the 48-byte header; ISVPRODID and ISVSVN at 256.
    isv_prod_id, isv_svn = struct.unpack_from("<HH", quote, 48 + 256)
    values = {"mrenclave": report.mr_enclave.hex(), "mrsigner": report.mr_signer.hex(),
              "isv_prod_id": str(isv_prod_id), "isv_svn": str(isv_svn)}
    return "sgx", values, bytes(report.report_data), bool(report.attributes[0] & SGX_DEBUG)


class DcapVerifier:
    name = NAME

    def __init__(self, collateral: CollateralStore | None = None,
                 test_root_der: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._collateral = collateral
        self._test_root = test_root_der
        self._clock = clock

    def __repr__(self) -> str:
        return f"DcapVerifier(root={'TEST' if self._test_root else 'Intel SGX Root CA'})"

    def verify(self, evidence: str) -> Claims:
        document = parse_evidence(evidence, "a DCAP")
        quote = _b64(document.get("quote"), "quote")
        collateral = document.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise AttestationRefused("evidence collateral is malformed")
        return self.verify_quote(quote, collateral)

    def verify_quote(self, quote: bytes, collateral: dict[str, Any] | None,
                     at: float | None = None) -> Claims:
        """Claims of a verified quote; ``AttestationRefused`` with dcap-qvl's reason."""
        if len(quote) > MAX_QUOTE_BYTES:
            raise AttestationRefused("quote is larger than any DCAP quote")
        tee, values, data, debug = quote_measurements(quote)
        if debug:
            raise AttestationRefused(f"the quote is from a debug {tee.upper()} "
                                     f"{'enclave' if tee == 'sgx' else 'TD'}: its memory is "
                                     "readable by the host")
        if collateral is None:
            if self._collateral is None:
                raise AttestationRefused("no collateral came with the quote and the verifier "
                                         "has no collateral cache")
            collateral = self._collateral.for_quote(quote, tee)
        text = json.dumps(collateral, sort_keys=True)
        now = int(self._clock() if at is None else at)
        try:
            parsed = dcap_qvl.QuoteCollateralV3.from_json(text)
            if self._test_root is not None:
                verified = dcap_qvl.verify_with_root_ca(quote, parsed, self._test_root, now)
            else:
                verified = dcap_qvl.verify(quote, parsed, now)
        except ValueError as exc:
            if self._test_root is None and _from_test_pki(quote):
                raise AttestationRefused(
                    f"{tee.upper()} quote refused: it is signed by a ppml-serve TEST PKI, not "
                    "Intel's (a development stack's key broker names that root in "
                    "keybroker.dcap_test_root_file)") from None
            raise AttestationRefused(f"{tee.upper()} quote refused: {_reason(exc)}") from None
        tcb_info = json.loads(str(collateral.get("tcb_info", "{}")))
        primary = values["mrtd"] if tee == "tdx" else values["mrenclave"]
        return Claims(provider=NAME, measurement=primary, report_data=data.hex(),
                      issued_at=float(now), debug=False,
                      hardware_protected=self._test_root is None, tee=tee,
                      measurements=values, tcb_status=str(verified.status),
                      advisories=tuple(str(a) for a in verified.advisory_ids),
                      collateral_issued=str(tcb_info.get("issueDate", "")),
                      collateral_sha256=hashlib.sha256(text.encode()).hexdigest(),
                      evidence_sha256=hashlib.sha256(quote).hexdigest(),
                      test_root=self._test_root is not None)
