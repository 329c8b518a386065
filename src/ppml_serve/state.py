"""The state directory of the embedded default: dev PKI, API key, local KMS."""

from __future__ import annotations

import os
from pathlib import Path

from ppml_serve.crypto.kms.local import LocalKMS, write_private
from ppml_serve.crypto.tls import ensure_dev_pki
from ppml_serve.gateway.auth import add_api_key
from ppml_serve.settings import Settings


def prepare_state(settings: Settings) -> None:
    """Create whatever is missing; never overwrite existing keys."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    ensure_dev_pki(state)
    if settings.security.encrypt_payloads:
        LocalKMS.open_or_create(settings.kms_dir)
    key_file = state / "api-key"
    if not key_file.exists() or not settings.api_keys_file.exists():
        token = add_api_key(settings.api_keys_file, "default", ["*"])
        write_private(key_file, (token + "\n").encode())


def read_api_key(state_dir: Path) -> str:
    return (state_dir / "api-key").read_text().strip()
