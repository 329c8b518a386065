"""Signed key-release policies: the broker takes a policy only when k of its n operators
signed its exact bytes (Ed25519), so no single person, and no one who can only write the
policy file, can allow a new measurement.

Signatures live beside the policy (``POLICY.sig``, JSON): each covers
``b"ppml-serve policy v1\\0" + SHA-256(policy bytes)``. Operators' public keys are named in
the broker's settings (``keybroker.policy_signers``, name -> base64 raw key) with
``keybroker.policy_threshold`` (k).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected, write_private

CONTEXT = b"ppml-serve policy v1\0"


class PolicyUnsigned(ConfigError):
    """The policy lacks enough valid operator signatures; the message says which."""


def signature_path(policy: Path) -> Path:
    return policy.with_name(policy.name + ".sig")


def _message(policy_bytes: bytes) -> bytes:
    return CONTEXT + hashlib.sha256(policy_bytes).digest()


def generate_signer(path: Path) -> str:
    """A new operator key (PEM, 0600) at ``path``; returns its public key (base64)."""
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def _signatures(policy: Path) -> dict[str, str]:
    path = signature_path(policy)
    try:
        document = json.loads(read_protected(path, secret=False))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise PolicyUnsigned(f"{path.name} is damaged") from None
    signatures = document.get("signatures") if isinstance(document, dict) else None
    if not isinstance(signatures, dict):
        raise PolicyUnsigned(f"{path.name} is damaged")
    return {str(name): str(value) for name, value in signatures.items()}


def sign_policy(policy: Path, key_file: Path, name: str) -> str:
    """Add (or replace) ``name``'s signature of the policy's current bytes; returns its
    SHA-256. Signatures of other bytes are dropped: they no longer count."""
    key = serialization.load_pem_private_key(read_protected(key_file), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{key_file} is not an Ed25519 signing key ('policy keygen')")
    data = read_protected(policy, secret=False)
    digest = hashlib.sha256(data).hexdigest()
    document: dict[str, object] = {"policy_sha256": digest, "signatures": {}}
    path = signature_path(policy)
    if path.exists():
        previous = json.loads(read_protected(path, secret=False))
        if isinstance(previous, dict) and previous.get("policy_sha256") == digest:
            document = previous
    signatures = document["signatures"]
    if not isinstance(signatures, dict):
        raise PolicyUnsigned(f"{path.name} is damaged")
    signatures[name] = base64.b64encode(key.sign(_message(data))).decode()
    write_private(path, json.dumps(document, indent=2, sort_keys=True).encode())
    return digest


def check_signatures(policy_bytes: bytes, policy: Path, signers: Mapping[str, str],
                     threshold: int) -> list[str]:
    """The names of the operators whose valid signatures cover ``policy_bytes``; raises
    ``PolicyUnsigned`` when fewer than ``threshold`` do."""
    valid = []
    message = _message(policy_bytes)
    for name, signature in sorted(_signatures(policy).items()):
        encoded = signers.get(name)
        if encoded is None:
            continue
        try:
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded, validate=True))
            public.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError, binascii.Error):
            continue
        valid.append(name)
    if len(valid) < threshold:
        raise PolicyUnsigned(
            f"{policy.name} carries {len(valid)} valid operator signature(s) of the "
            f"{threshold} required ({', '.join(valid) or 'none'}): sign it with 'ppml-serve "
            "policy sign'")
    return valid
