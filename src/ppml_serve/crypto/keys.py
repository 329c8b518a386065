"""Open the configured KMS and the record keyring from settings."""

from __future__ import annotations

import os

from pydantic import SecretStr

from ppml_serve.crypto.envelope import ModelSealers, PlaintextSealer
from ppml_serve.crypto.keystore import DATA_KEYS_FILE, DataKeyTable
from ppml_serve.crypto.kms.base import KMS
from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected
from ppml_serve.settings import Settings

PASSPHRASE_ENV = "PPML_KMS_PASSPHRASE"  # noqa: S105 - the variable name, not a secret


def kms_passphrase(settings: Settings) -> SecretStr:
    """From ``PPML_KMS_PASSPHRASE``, else from ``security.kms_passphrase_file``."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return SecretStr(value)
    path = settings.kms_passphrase_file
    try:
        text = read_protected(path).decode().strip()
    except OSError as exc:
        raise ConfigError(f"security.kms_passphrase_file: cannot read {path} ({exc.strerror}); "
                          f"or set {PASSPHRASE_ENV}") from None
    if not text:
        raise ConfigError(f"security.kms_passphrase_file: {path} is empty")
    return SecretStr(text)


def open_kms(settings: Settings) -> KMS:
    security = settings.security
    if security.kms == "aws":
        from ppml_serve.crypto.kms.aws import AwsKMS

        return AwsKMS(security.aws_kms_key_id, security.aws_region,
                      security.aws_endpoint_url)
    if security.kms == "kmip":
        from ppml_serve.crypto.kms.kmip import KmipKMS

        if security.kmip_cert_file is None or security.kmip_key_file is None:
            raise ConfigError("security.kmip_cert_file and security.kmip_key_file are required "
                              "for kms: kmip")
        return KmipKMS(security.kmip_host, security.kmip_port, security.kmip_cert_file,
                       security.kmip_key_file, security.kmip_ca_file or settings.ca_file,
                       settings.kms_dir)
    from ppml_serve.crypto.kms.local import LocalKMS

    return LocalKMS(settings.kms_dir, kms_passphrase(settings))


def data_key_table(settings: Settings) -> DataKeyTable:
    return DataKeyTable.load(settings.kms_dir / DATA_KEYS_FILE)


def make_sealer(settings: Settings) -> ModelSealers:
    """The gateway's record sealers: each model's keyring derived from the KMS's record keys,
    or nothing in plain mode."""
    if not settings.security.encrypt_payloads:
        return PlaintextSealer()
    return data_key_table(settings).keyring(open_kms(settings))
