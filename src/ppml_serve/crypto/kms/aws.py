"""AWS KMS adapter (boto3): data keys from GenerateDataKey, bound to an encryption context.

Credentials come from the usual AWS sources (environment, profile, instance role) and are
never logged. ``endpoint_url`` points at a compatible endpoint (tests use a local moto server).
"""

from __future__ import annotations

from typing import Any

from ppml_serve.crypto.kms.base import DataKey
from ppml_serve.errors import ConfigError, IntegrityError, KMSUnavailable, NotReady

CONTEXT = {"service": "ppml-serve"}


class AwsKMS:
    def __init__(self, key_id: str | None, region: str, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        if client is None:
            import boto3

            client = boto3.client("kms", region_name=region, endpoint_url=endpoint_url)
        self._client = client
        self._key_id = key_id
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        self._unreachable: type[Exception] = BotoCoreError

    def __repr__(self) -> str:
        return f"AwsKMS(key_id={self._key_id!r})"

    def _code(self, exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", type(exc).__name__))

    def create_primary_key(self) -> str:
        try:
            metadata = self._client.create_key(KeySpec="SYMMETRIC_DEFAULT",
                                               KeyUsage="ENCRYPT_DECRYPT",
                                               Description="ppml-serve primary key")
        except self._errors as exc:
            raise NotReady(f"AWS KMS refused CreateKey ({self._code(exc)})") from None
        key_id = str(metadata["KeyMetadata"]["KeyId"])
        if self._key_id is None:
            self._key_id = key_id
        return key_id

    def generate_data_key(self, primary_key_id: str | None = None) -> DataKey:
        key_id = primary_key_id or self._key_id
        if key_id is None:
            raise ConfigError("security.aws_kms_key_id: no AWS KMS key configured")
        try:
            response = self._client.generate_data_key(KeyId=key_id, KeySpec="AES_256",
                                                      EncryptionContext=CONTEXT)
        except self._errors as exc:
            raise NotReady(f"AWS KMS refused GenerateDataKey ({self._code(exc)})") from None
        return DataKey(bytes(response["Plaintext"]), bytes(response["CiphertextBlob"]), key_id)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            response = self._client.decrypt(CiphertextBlob=wrapped, EncryptionContext=CONTEXT)
        except self._errors as exc:
            if isinstance(exc, self._unreachable):  # no answer: an outage, not a verdict
                raise KMSUnavailable(f"AWS KMS unreachable ({type(exc).__name__})") from None
            if self._code(exc) == "InvalidCiphertextException":
                raise IntegrityError("wrapped data key is invalid or was tampered with") from None
            raise NotReady(f"AWS KMS refused Decrypt ({self._code(exc)})") from None
        return bytes(response["Plaintext"])

    def rotate(self, primary_key_id: str | None = None) -> str:
        key_id = primary_key_id or self._key_id
        try:
            self._client.enable_key_rotation(KeyId=key_id)
        except self._errors as exc:
            raise NotReady(f"AWS KMS refused EnableKeyRotation ({self._code(exc)})") from None
        return f"{key_id}: automatic rotation enabled (old data keys stay decryptable)"
