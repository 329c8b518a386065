"""Verifier of AMD SEV-SNP attestation reports, with ``cryptography`` only.

Chain: AMD Root Key (ARK, pinned by the SHA-256 of its certificate per product: Milan, Genoa,
Turin) signs itself and the AMD SEV Key (ASK), which signs the chip's Versioned Chip
Endorsement Key certificate (VCEK), all RSA-PSS with SHA-384; the VCEK's P-384 key signs the
report (ECDSA, SHA-384). The VCEK must be this chip's (its hwID extension equals the report's
CHIP_ID) at the reported TCB (its SPL extensions equal the reported TCB's components).

Evidence is JSON: ``{"report": base64, "vcek": base64 DER, "ask": ..., "ark": ...}``; ASK and
ARK may come from the evidence (a hypervisor's extended report carries them) because the ARK
is checked against the pin.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims
from ppml_serve.crypto.attestation.base import evidence_document as parse_evidence
from ppml_serve.crypto.attestation.collateral import CollateralStore

NAME = "snp"
REPORT_BYTES = 0x4A0
SIGNED_BYTES = 0x2A0

# SHA-256 of each product's ARK certificate (DER) as AMD's KDS serves it.
PINNED_ARKS = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}

POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19

_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
_OID_SPL = {"bootloader": "1.3.6.1.4.1.3704.1.3.1", "tee": "1.3.6.1.4.1.3704.1.3.2",
            "snp": "1.3.6.1.4.1.3704.1.3.3", "microcode": "1.3.6.1.4.1.3704.1.3.8"}


@dataclass(frozen=True)
class Report:
    """The fields of an SEV-SNP ATTESTATION_REPORT (AMD SEV-SNP ABI, table "ATTESTATION_REPORT
    Structure") that a policy judges."""

    version: int
    guest_svn: int
    policy: int
    vmpl: int
    signature_algo: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    chip_id: bytes
    reported_tcb: bytes
    signed: bytes
    signature: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Report:
        if len(raw) != REPORT_BYTES:
            raise AttestationRefused(f"an SEV-SNP report is {REPORT_BYTES} bytes, not {len(raw)}")
        version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
        vmpl, algo = struct.unpack_from("<II", raw, 0x30)
        if version < 2:
            raise AttestationRefused(f"SEV-SNP report version {version} is not supported")
        return cls(version, guest_svn, policy, vmpl, algo, raw[0x50:0x90], raw[0x90:0xC0],
                   raw[0xC0:0xE0], raw[0x1A0:0x1E0], raw[0x180:0x188], raw[:SIGNED_BYTES],
                   raw[SIGNED_BYTES:SIGNED_BYTES + 144])

    def tcb(self, product: str) -> dict[str, int]:
        """Reported TCB components; Turin moved them (an FMC byte first)."""
        b = self.reported_tcb
        if product == "Turin":
            return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
        return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


def _der(document: dict[str, object], name: str) -> bytes | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AttestationRefused(f"evidence {name} is malformed")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationRefused(f"evidence {name} is not base64") from None


def _load(der: bytes, what: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():  # AMD's VCEKs have non-positive serial numbers
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(der)
    except ValueError:
        raise AttestationRefused(f"the {what} certificate is malformed") from None


def _pss_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationRefused(f"the {what} issuer key is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
                   hashes.SHA384())
    except InvalidSignature:
        raise AttestationRefused(f"the {what} certificate is not signed by its issuer") from None


def _within(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationRefused(f"the {what} certificate is not valid at {now:%Y-%m-%d}")


def _extension_int(cert: x509.Certificate, oid: str) -> int:
    try:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        raise AttestationRefused("the VCEK lacks its TCB extensions") from None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    if len(raw) < 3 or raw[0] != 0x02:  # DER INTEGER, short form
        raise AttestationRefused("the VCEK's TCB extension is malformed")
    return int.from_bytes(raw[2:2 + raw[1]], "big")


def _product(ark: x509.Certificate) -> str:
    digest = hashlib.sha256(ark.public_bytes(serialization.Encoding.DER)).hexdigest()
    for product, pinned in PINNED_ARKS.items():
        if digest == pinned:
            return product
    raise AttestationRefused("the ARK is not one of AMD's pinned root keys (Milan, Genoa, Turin)")


class SnpVerifier:
    name = NAME

    def __init__(self, collateral: CollateralStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._collateral = collateral
        self._clock = clock

    def __repr__(self) -> str:
        return "SnpVerifier(ARK pinned: Milan, Genoa, Turin)"

    def verify(self, evidence: str) -> Claims:
        document = parse_evidence(evidence, "an SEV-SNP")
        report, vcek = _der(document, "report"), _der(document, "vcek")
        ask, ark = _der(document, "ask"), _der(document, "ark")
        if report is None:
            raise AttestationRefused("SEV-SNP evidence needs the report")
        if (vcek is None or ask is None or ark is None) and self._collateral is not None:
            parsed = Report.parse(report)
            for product in PINNED_ARKS:  # the cache knows which product's chain it holds
                try:
                    cached = self._collateral.snp_certificates(parsed.chip_id.hex(),
                                                               parsed.tcb(product))
                except AttestationRefused:
                    continue
                vcek, ask, ark = cached["vcek"], cached["ask"], cached["ark"]
                break
        if vcek is None or ask is None or ark is None:
            raise AttestationRefused("SEV-SNP evidence needs the VCEK, ASK and ARK (from the "
                                     "extended report, or the collateral cache)")
        return self.verify_report(report, vcek, ask, ark)

    def verify_report(self, raw: bytes, vcek_der: bytes, ask_der: bytes, ark_der: bytes,
                      at: float | None = None) -> Claims:
        report = Report.parse(raw)
        now = dt.datetime.fromtimestamp(self._clock() if at is None else at, dt.timezone.utc)
        ark, ask, vcek = _load(ark_der, "ARK"), _load(ask_der, "ASK"), _load(vcek_der, "VCEK")
        product = _product(ark)
        _pss_signed_by(ark, ark, "ARK")
        _pss_signed_by(ask, ark, "ASK")
        _pss_signed_by(vcek, ask, "VCEK")
        for cert, what in ((ark, "ARK"), (ask, "ASK"), (vcek, "VCEK")):
            _within(cert, now, what)
        if report.signature_algo != 1:
            raise AttestationRefused(f"unknown report signature algorithm {report.signature_algo}")
        key = vcek.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise AttestationRefused("the VCEK key is not ECDSA P-384")
        r = int.from_bytes(report.signature[:72], "little")
        s = int.from_bytes(report.signature[72:144], "little")
        try:
            key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise AttestationRefused("the SEV-SNP report signature is not valid") from None
        try:
            hwid = vcek.extensions.get_extension_for_oid(_OID_HWID).value
        except x509.ExtensionNotFound:
            raise AttestationRefused("the VCEK names no chip (hwID)") from None
        chip = hwid.value if isinstance(hwid, x509.UnrecognizedExtension) else b""
        if not chip.endswith(report.chip_id) or report.chip_id == bytes(64):
            raise AttestationRefused("the VCEK is another chip's (hwID differs from CHIP_ID)")
        tcb = report.tcb(product)
        for component, oid in _OID_SPL.items():
            if _extension_int(vcek, oid) != tcb[component]:
                raise AttestationRefused(
                    f"the VCEK is for another TCB ({component} differs from the report's)")
        debug = bool(report.policy & POLICY_DEBUG)
        values = {"measurement": report.measurement.hex(), "host_data": report.host_data.hex(),
                  "vmpl": str(report.vmpl), "policy": f"{report.policy:#x}",
                  "guest_svn": str(report.guest_svn), "product": product,
                  "migrate_ma": str(bool(report.policy & POLICY_MIGRATE_MA)).lower(),
                  **{f"tcb_{name}": str(value) for name, value in tcb.items()}}
        return Claims(provider=NAME, measurement=report.measurement.hex(),
                      report_data=report.report_data.hex(), issued_at=now.timestamp(),
                      debug=debug, hardware_protected=True, tee="snp", measurements=values,
                      tcb_status="Verified", collateral_sha256=hashlib.sha256(
                          vcek_der + ask_der + ark_der).hexdigest(),
                      evidence_sha256=hashlib.sha256(raw).hexdigest())
