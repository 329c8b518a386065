"""Choose the record sealer a process uses, from settings."""

from __future__ import annotations

from ppml_serve.crypto.envelope import PlaintextSealer, Sealer
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.settings import Settings


def make_sealer(settings: Settings) -> Sealer:
    if not settings.security.encrypt_payloads:
        return PlaintextSealer()
    return LocalKMS(settings.kms_dir).keyring()
