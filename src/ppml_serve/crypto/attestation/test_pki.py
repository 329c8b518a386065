"""A TEST public-key infrastructure that makes Intel DCAP (SGX ECDSA) quotes without hardware.

It plays Intel's part (a root CA, a PCK CA, a PCK certificate carrying the SGX extension, a
TCB signing certificate, CRLs, signed TCB info and QE identity) and the quoting enclave's part
(an attestation key certified by a QE report that the PCK key signs), so that the real
verifier (``dcap-qvl``) checks every signature, chain, CRL and TCB level of a quote it built.

It gives NO hardware protection: whoever holds the state directory's test keys can make any
quote. Quotes from it verify only against its own root through an explicit test-root setting
(``keybroker.dcap_test_root_file``), never against Intel's pinned root, and the verifier marks
their claims ``hardware_protected: false``. ``up`` uses it so that the default stack runs the
real quote verifier; tests use it for every refusal a hardware quote can meet.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected, write_private

KEYS_FILE = "test-pki-keys.pem"
ROOT_FILE = "test-pki-root.der"

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
SGX_EXTENSION = "1.2.840.113741.1.13.1"
FMSPC = bytes.fromhex("00906ED50000")
PCE_ID = b"\x00\x00"
PCE_SVN = 13
QE_SVN = 8
CPU_SVN = bytes([11, 11, 2, 2, 255, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0])
QE_MRSIGNER = hashlib.sha256(b"ppml-serve TEST quoting enclave signer").digest()
QE_PROD_ID = 1

ATTR_INIT_MODE64 = 0x05
ATTR_DEBUG = 0x02

_NAMES = ("root", "pck-ca", "pck", "tcb")


def _der(tag: int, body: bytes) -> bytes:
    """DER tag-length-value (only for the few values this module writes itself)."""
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, body)


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=False))


def _entry(oid: str, value: bytes) -> bytes:
    return _der(0x30, _oid(oid) + value)


def sgx_extension(ppid: bytes, cpu_svn: bytes = CPU_SVN, pce_svn: int = PCE_SVN,
                  fmspc: bytes = FMSPC) -> bytes:
    """The PCK certificate's SGX extension (Intel's PCK certificate profile)."""
    base = SGX_EXTENSION
    tcb = b"".join(_entry(f"{base}.2.{i + 1}", _int(svn)) for i, svn in enumerate(cpu_svn))
    tcb += _entry(f"{base}.2.17", _int(pce_svn)) + _entry(f"{base}.2.18", _der(0x04, cpu_svn))
    return _der(0x30, _entry(f"{base}.1", _der(0x04, ppid))
                + _der(0x30, _oid(f"{base}.2") + _der(0x30, tcb))
                + _entry(f"{base}.3", _der(0x04, PCE_ID))
                + _entry(f"{base}.4", _der(0x04, fmspc))
                + _entry(f"{base}.5", _der(0x0A, b"\x00")))


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)[1:]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml-serve TEST PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool, now: dt.datetime,
          extra: x509.ExtensionType | None = None) -> x509.Certificate:
    issuer_name = issuer.subject if issuer is not None else _name(subject)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                              critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                   encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int],
         now: dt.datetime, valid: dt.timedelta) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(now - dt.timedelta(hours=1)).next_update(now + valid)
               .add_extension(x509.CRLNumber(1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   key.public_key()), critical=False))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - dt.timedelta(hours=1)).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def enclave_report(report_data: bytes, mrenclave: bytes, mrsigner: bytes, *, debug: bool = False,
                   isv_prod_id: int = 0, isv_svn: int = 0, cpu_svn: bytes = CPU_SVN,
                   attributes: int = ATTR_INIT_MODE64) -> bytes:
    """An SGX REPORT body (384 bytes) as the quote carries it."""
    if len(report_data) != 64 or len(mrenclave) != 32 or len(mrsigner) != 32:
        raise ValueError("report_data is 64 bytes, MRENCLAVE and MRSIGNER 32 each")
    flags = attributes | (ATTR_DEBUG if debug else 0)
    return (cpu_svn + b"\0" * 4 + b"\0" * 28 + struct.pack("<Q", flags) + struct.pack("<Q", 0xE7)
            + mrenclave + b"\0" * 32 + mrsigner + b"\0" * 96
            + struct.pack("<HH", isv_prod_id, isv_svn) + b"\0" * 60 + report_data)


@dataclass
class TestPki:
    """The test keys and certificates; ``generate`` once, ``save``/``load`` in a state dir."""

    __test__ = False  # a fixture maker, not a pytest test class

    keys: dict[str, ec.EllipticCurvePrivateKey] = field(repr=False)
    certs: dict[str, x509.Certificate]
    ppid: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "TestPki(TEST ROOT, NO HARDWARE PROTECTION)"

    @classmethod
    def generate(cls, now: dt.datetime | None = None) -> TestPki:
        now = now or dt.datetime.now(dt.timezone.utc)
        keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in _NAMES}
        ppid = secrets.token_bytes(16)
        root = _cert("ppml-serve TEST SGX Root CA", keys["root"], None, keys["root"], True, now)
        pck_ca = _cert("ppml-serve TEST SGX PCK Processor CA", keys["pck-ca"], root,
                       keys["root"], True, now)
        pck = _cert("ppml-serve TEST SGX PCK Certificate", keys["pck"], pck_ca, keys["pck-ca"],
                    False, now, x509.UnrecognizedExtension(
                        x509.ObjectIdentifier(SGX_EXTENSION), sgx_extension(ppid)))
        tcb = _cert("ppml-serve TEST SGX TCB Signing", keys["tcb"], root, keys["root"], False,
                    now)
        return cls(keys, {"root": root, "pck-ca": pck_ca, "pck": pck, "tcb": tcb}, ppid)

    @property
    def root_der(self) -> bytes:
        return self.certs["root"].public_bytes(serialization.Encoding.DER)

    def save(self, directory: Path) -> None:
        """Private keys (0600) and the root certificate the broker's test setting names."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        parts = [f"ppid {self.ppid.hex()}\n".encode()]
        parts += [self.keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()) for name in _NAMES]
        parts += [self.certs[name].public_bytes(serialization.Encoding.PEM) for name in _NAMES]
        write_private(directory / KEYS_FILE, b"".join(parts))
        write_private(directory / ROOT_FILE, self.root_der)

    @classmethod
    def load(cls, directory: Path) -> TestPki:
        data = read_protected(directory / KEYS_FILE)
        blocks = [b"-----BEGIN" + chunk for chunk in data.split(b"-----BEGIN")[1:]]
        if len(blocks) != 2 * len(_NAMES):
            raise ValueError(f"{directory / KEYS_FILE} is not a test PKI file")
        keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        for name, block in zip(_NAMES, blocks[:len(_NAMES)], strict=True):
            key = serialization.load_pem_private_key(block, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("test PKI keys are P-256")
            keys[name] = key
        certs = {name: x509.load_pem_x509_certificate(block)
                 for name, block in zip(_NAMES, blocks[len(_NAMES):], strict=True)}
        ppid = bytes.fromhex(data.split(b"\n", 1)[0].removeprefix(b"ppid ").decode())
        return cls(keys, certs, ppid)

    def quote(self, report_data: bytes, mrenclave: bytes, *, mrsigner: bytes | None = None,
              debug: bool = False, isv_prod_id: int = 0, isv_svn: int = 0) -> bytes:
        """An SGX ECDSA quote (version 3, certification data type 5) over this report."""
        header = struct.pack("<HHIHH", 3, 2, 0, QE_SVN, PCE_SVN) + INTEL_QE_VENDOR_ID + b"\0" * 20
        body = enclave_report(report_data, mrenclave, mrsigner or b"\x11" * 32, debug=debug,
                              isv_prod_id=isv_prod_id, isv_svn=isv_svn)
        attestation_key = ec.generate_private_key(ec.SECP256R1())
        attestation_public = _raw_public(attestation_key)
        auth_data = secrets.token_bytes(32)
        qe_binding = hashlib.sha256(attestation_public + auth_data).digest() + b"\0" * 32
        qe_report = enclave_report(qe_binding, hashlib.sha256(b"TEST QE").digest(), QE_MRSIGNER,
                                   isv_prod_id=QE_PROD_ID, isv_svn=QE_SVN, attributes=0x11)
        chain = b"".join(self.certs[name].public_bytes(serialization.Encoding.PEM)
                         for name in ("pck", "pck-ca", "root"))
        signature_data = (_raw_signature(attestation_key, header + body) + attestation_public
                          + qe_report + _raw_signature(self.keys["pck"], qe_report)
                          + struct.pack("<H", len(auth_data)) + auth_data
                          + struct.pack("<HI", 5, len(chain)) + chain)
        return header + body + struct.pack("<I", len(signature_data)) + signature_data

    def collateral(self, now: dt.datetime | None = None, *, tcb_status: str = "UpToDate",
                   advisories: tuple[str, ...] = (), revoke_pck: bool = False,
                   valid: dt.timedelta = dt.timedelta(days=30)) -> dict[str, Any]:
        """Collateral in ``dcap-qvl``'s JSON layout, issued an hour before ``now``."""
        now = now or dt.datetime.now(dt.timezone.utc)
        issued, next_update = _stamp(now - dt.timedelta(hours=1)), _stamp(now + valid)
        level: dict[str, Any] = {
            "tcb": {"sgxtcbcomponents": [{"svn": svn} for svn in CPU_SVN], "pcesvn": PCE_SVN},
            "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": tcb_status}
        if advisories:
            level["advisoryIDs"] = list(advisories)
        tcb_info = json.dumps({
            "id": "SGX", "version": 3, "issueDate": issued, "nextUpdate": next_update,
            "fmspc": FMSPC.hex().upper(), "pceId": PCE_ID.hex(), "tcbType": 0,
            "tcbEvaluationDataNumber": 17, "tcbLevels": [level]}, separators=(",", ":"))
        qe_identity = json.dumps({
            "id": "QE", "version": 2, "issueDate": issued, "nextUpdate": next_update,
            "tcbEvaluationDataNumber": 17, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex().upper(), "isvprodid": QE_PROD_ID,
            "tcbLevels": [{"tcb": {"isvsvn": QE_SVN}, "tcbDate": "2024-03-13T00:00:00Z",
                           "tcbStatus": "UpToDate"}]}, separators=(",", ":"))

        def pem(*names: str) -> str:
            return "".join(self.certs[name].public_bytes(serialization.Encoding.PEM).decode()
                           for name in names)
        revoked = [self.certs["pck"].serial_number] if revoke_pck else []
        return {
            "pck_crl_issuer_chain": pem("pck-ca", "root"),
            "root_ca_crl": _crl(self.certs["root"], self.keys["root"], [], now, valid).hex(),
            "pck_crl": _crl(self.certs["pck-ca"], self.keys["pck-ca"], revoked, now, valid).hex(),
            "tcb_info_issuer_chain": pem("tcb", "root"),
            "tcb_info": tcb_info,
            "tcb_info_signature": _raw_signature(self.keys["tcb"], tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": pem("tcb", "root"),
            "qe_identity": qe_identity,
            "qe_identity_signature": _raw_signature(self.keys["tcb"], qe_identity.encode()).hex(),
        }


def ensure_test_pki(directory: Path) -> None:
    """Create the state directory's test PKI once (``init``/``up``)."""
    if (directory / KEYS_FILE).exists():
        return
    TestPki.generate().save(directory)


class TestPkiProvider:
    """The worker's side for development stacks: DCAP quotes from the state directory's test
    PKI, with MRENCLAVE = the worker's software measurement, and fresh collateral attached.
    NO hardware protection (``up`` says so; the default policy refuses it)."""

    name = "dcap"
    __test__ = False

    def __init__(self, directory: Path) -> None:
        try:
            self._pki = TestPki.load(directory)
        except FileNotFoundError:
            raise ConfigError(f"security.attestation: no test PKI in {directory}; run "
                              "'ppml-serve init'") from None

    def __repr__(self) -> str:
        return "TestPkiProvider(TEST ROOT, NO HARDWARE PROTECTION)"

    def evidence(self, measurement: str, report_data: str, nonce: str | None) -> str:
        mrenclave = bytes.fromhex(measurement)
        if len(mrenclave) != 32:
            raise ConfigError("a test-PKI quote carries a 32-byte measurement")
        quote = self._pki.quote(bytes.fromhex(report_data) + bytes(32), mrenclave)
        return json.dumps({"quote": base64.b64encode(quote).decode(),
                           "collateral": self._pki.collateral()})
