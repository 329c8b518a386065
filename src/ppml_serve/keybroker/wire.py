"""The key broker's wire payloads, shared by the broker and the worker's client (pydantic):
one definition of each field, its encoding and its bounds."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer


def _b64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


Base64 = Annotated[bytes, BeforeValidator(_b64),
                   PlainSerializer(lambda data: base64.b64encode(data).decode(), return_type=str)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NonceAnswer(_Wire):
    nonce: str


class ReleaseAsk(_Wire):
    """A worker's request for its model's keys."""

    provider: str = Field(max_length=64)
    evidence: str = Field(repr=False, max_length=256 * 1024)
    public_key: Base64 = Field(min_length=32, max_length=32)
    model: str = Field(min_length=1, max_length=256)
    model_key: Base64 | None = Field(None, repr=False, max_length=4096)
    nonce: str | None = Field(None, max_length=128)


class ReleaseAnswer(_Wire):
    sealed_keys: Base64 = Field(repr=False)


class ReleasedKeysPayload(_Wire):
    """What ``sealed_keys`` opens to: only the asking worker's ephemeral key can."""

    record_keys: dict[str, Base64] = Field(repr=False)
    active: str
    model_key: Base64 | None = Field(None, repr=False)
    inference_key: Base64 = Field(repr=False)
    inference_public_key: Base64
