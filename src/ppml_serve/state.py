"""The state directory of the embedded default: dev PKI, API key, KMS, attestation keys."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ppml_serve.crypto.attestation.simulated import ensure_platform_key
from ppml_serve.crypto.attestation.test_pki import ensure_test_pki
from ppml_serve.crypto.keys import PASSPHRASE_ENV, kms_passphrase, open_kms
from ppml_serve.crypto.keystore import DATA_KEYS_FILE, DataKeyTable
from ppml_serve.crypto.kms.local import PRIMARY_FILE, LocalKMS
from ppml_serve.crypto.tls import ensure_dev_pki
from ppml_serve.gateway.auth import add_api_key, list_api_keys, revoke_api_key
from ppml_serve.private_files import read_protected, secure_directory, write_private
from ppml_serve.settings import Settings


def prepare_state(settings: Settings) -> None:
    """Create whatever is missing; never overwrite existing keys."""
    state = settings.state_dir
    secure_directory(state)  # refuses one that someone else owns or could write
    ensure_dev_pki(state)
    if settings.security.kms == "local" and not (settings.kms_dir / PRIMARY_FILE).exists():
        if not os.environ.get(PASSPHRASE_ENV) and not settings.kms_passphrase_file.exists():
            # Development default only: production supplies the passphrase from elsewhere.
            write_private(settings.kms_passphrase_file, secrets.token_urlsafe(32).encode())
        LocalKMS.create(settings.kms_dir, kms_passphrase(settings))
    if not (settings.kms_dir / DATA_KEYS_FILE).exists():
        settings.kms_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kms = open_kms(settings)
        if settings.security.kms == "kmip" and not (settings.kms_dir / "kmip.json").exists():
            kms.create_primary_key()
        DataKeyTable.create(settings.kms_dir / DATA_KEYS_FILE, kms)
    if settings.security.attestation == "simulated":
        ensure_platform_key(settings.attestation_dir)
    if settings.security.attestation == "dcap-test":
        ensure_test_pki(settings.attestation_dir)
    key_file = state / "api-key"
    if not key_file.exists() or not settings.api_keys_file.exists():
        if settings.api_keys_file.exists() and any(
                key["name"] == "default" for key in list_api_keys(settings.api_keys_file)):
            # Its token file is gone, so the old default key can never be used again.
            revoke_api_key(settings.api_keys_file, "default")
        token = add_api_key(settings.api_keys_file, "default", ["*"], ("infer", "metrics", "admin"))
        write_private(key_file, (token + "\n").encode())


def read_api_key(state_dir: Path) -> str:
    return read_protected(state_dir / "api-key").decode().strip()
