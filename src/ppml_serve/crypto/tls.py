"""TLS material: a generated development CA and server certificate, and client contexts."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ppml_serve.private_files import read_protected, write_private

SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites every server of ours offers (gateway, Redis): forward-secret AEAD only, no
CBC, no SHA-1 MACs. TLS 1.3's suites are all AEAD already."""


@dataclass(frozen=True)
class DevPki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml-serve development"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_dev_pki(directory: Path) -> DevPki:
    """Create (once) a dev CA and a server certificate for localhost and this host's name."""
    pki = DevPki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if pki.ca_file.exists() and pki.cert_file.exists() and pki.key_file.exists():
        return pki
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ppml-serve dev CA"))
        .issuer_name(_name("ppml-serve dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(directory / "ca-key.pem", _pem_key(ca_key))
    write_private(pki.key_file, _pem_key(server_key))
    # certificates are public, but every file of a state directory is owner-only
    write_private(pki.cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(pki.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    return pki


def _issue(ca_directory: Path, common_name: str, usage: x509.ObjectIdentifier,
           alternative_names: list[x509.GeneralName]) -> tuple[x509.Certificate, bytes, bytes]:
    """A leaf certificate signed by the dev CA: (CA certificate, certificate PEM, key PEM)."""
    ca_key = serialization.load_pem_private_key(read_protected(ca_directory / "ca-key.pem"),
                                                None)
    ca_cert = x509.load_pem_x509_certificate(read_protected(ca_directory / "ca.pem", secret=False))
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the dev CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return ca_cert, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_server_cert(ca_directory: Path, out_directory: Path, name: str,
                      addresses: list[str]) -> tuple[Path, Path]:
    """A server certificate from the dev CA for a part on another host: ``name`` and
    ``addresses`` (host names or IP addresses) as subject alternative names. Writes
    ``server.pem``, ``server-key.pem`` (0600) and ``ca.pem`` into ``out_directory``."""
    names: list[x509.GeneralName] = []
    for address in [name, *addresses]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    ca_cert, cert, key = _issue(ca_directory, name, ExtendedKeyUsageOID.SERVER_AUTH, names)
    out_directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_file, key_file = out_directory / "server.pem", out_directory / "server-key.pem"
    write_private(key_file, key)
    write_private(cert_file, cert)
    write_private(out_directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def issue_client_cert(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A client certificate (clientAuth) from the dev CA, e.g. for a KMIP server's mTLS."""
    _, cert, key = _issue(directory, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    cert_file, key_file = directory / f"{common_name}.pem", directory / f"{common_name}-key.pem"
    write_private(key_file, key)
    write_private(cert_file, cert)
    return cert_file, key_file


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context trusting ``ca_file`` (or the system store)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context with forward-secret AEAD suites only (``SERVER_CIPHERS``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(SERVER_CIPHERS)
    context.load_cert_chain(str(cert_file), str(key_file))
    return context
