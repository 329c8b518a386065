"""SIMULATED attestation: evidence signed with a local Ed25519 "platform key".

This gives NO hardware protection: whoever can read the platform key can forge evidence,
exactly like SGX simulation mode. It exists so that the key-release flow, the policy check and
the refusal of wrong measurements, stale or replayed evidence are real and testable without
a TEE. The default production policy refuses it.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims
from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected, write_private

NAME = "simulated"
PRIVATE_FILE = "simulated-platform-key.pem"
PUBLIC_FILE = "simulated-platform-key.pub.pem"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ensure_platform_key(directory: Path) -> None:
    if (directory / PRIVATE_FILE).exists():
        return
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    write_private(directory / PRIVATE_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_private(directory / PUBLIC_FILE, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


class SimulatedProvider:
    name = NAME

    def __init__(self, directory: Path, clock: object = time.time) -> None:
        try:
            pem = read_protected(directory / PRIVATE_FILE)
        except FileNotFoundError:
            raise ConfigError(f"security.attestation: no simulated platform key in {directory}; "
                              "run 'ppml-serve init'") from None
        key = serialization.load_pem_private_key(pem, None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AttestationRefused("simulated platform key is not Ed25519")
        self._key = key
        self._clock = clock

    def __repr__(self) -> str:
        return "SimulatedProvider(NO HARDWARE PROTECTION)"

    def evidence(self, measurement: str, report_data: str, nonce: str | None) -> str:
        now = self._clock() if callable(self._clock) else time.time()
        claims = {"provider": NAME, "measurement": measurement, "report_data": report_data,
                  "nonce": nonce, "issued_at": now, "debug": True,
                  "warning": "simulated attestation: no hardware protection"}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._key.sign(body.encode()))}"


class SimulatedVerifier:
    name = NAME

    def __init__(self, public_key_pem: bytes) -> None:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise AttestationRefused("simulated platform public key is not Ed25519")
        self._key = key

    @classmethod
    def from_directory(cls, directory: str | Path) -> SimulatedVerifier:
        return cls(read_protected(Path(directory) / PUBLIC_FILE, secret=False))

    def verify(self, evidence: str) -> Claims:
        try:
            body, signature = evidence.split(".")
            self._key.verify(_unb64(signature), body.encode())
            claims = json.loads(_unb64(body))
            return Claims(provider=str(claims["provider"]), measurement=str(claims["measurement"]),
                          report_data=str(claims["report_data"]),
                          issued_at=float(claims["issued_at"]), debug=bool(claims["debug"]),
                          nonce=claims.get("nonce"), hardware_protected=False)
        except InvalidSignature:
            raise AttestationRefused("evidence signature is not valid") from None
        except (ValueError, KeyError, TypeError):
            raise AttestationRefused("evidence is malformed") from None
