"""The worker's side of key release: fresh key pair, nonce, evidence, sealed keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from ppml_serve.crypto.attestation.base import AttestationRefused, Provider, report_data
from ppml_serve.crypto.sealed_box import open_sealed, public_bytes
from ppml_serve.errors import NotReady
from ppml_serve.keybroker.service import RELEASE_INFO
from ppml_serve.keybroker.wire import NonceAnswer, ReleaseAnswer, ReleaseAsk, ReleasedKeysPayload


@dataclass(frozen=True)
class ReleasedKeys:
    record_keys: dict[str, bytes] = field(repr=False)
    active_record_key: str
    model_key: bytes | None = field(repr=False)
    inference_key: X25519PrivateKey = field(repr=False)


def obtain_keys(broker_url: str, ca_file: Path | None, provider: Provider, measurement: str,
                model: str, model_key: bytes | None, timeout_s: float = 10.0) -> ReleasedKeys:
    """Attest to the broker and receive keys; ``AttestationRefused`` carries its reason."""
    ephemeral = X25519PrivateKey.generate()
    public_key = public_bytes(ephemeral)
    verify: str | bool = str(ca_file) if ca_file else True
    try:
        with httpx.Client(base_url=broker_url, verify=verify, timeout=timeout_s) as http:
            nonce = NonceAnswer.model_validate_json(http.post("/v1/nonce").content).nonce
            evidence = provider.evidence(measurement, report_data(public_key, nonce), nonce)
            ask = ReleaseAsk(provider=provider.name, evidence=evidence, public_key=public_key,
                             model=model, model_key=model_key, nonce=nonce)
            response = http.post("/v1/release", json=ask.model_dump(mode="json"))
    except httpx.HTTPError as exc:
        raise NotReady(f"key broker unreachable at {broker_url} ({type(exc).__name__})") from None
    if response.status_code == 403:
        raise AttestationRefused(response.json().get("error", "key release refused"))
    if response.status_code != 200:
        raise NotReady(f"key broker answered {response.status_code}")
    try:
        sealed = ReleaseAnswer.model_validate_json(response.content).sealed_keys
        payload = ReleasedKeysPayload.model_validate_json(
            open_sealed(ephemeral, sealed, RELEASE_INFO))
    except ValidationError:
        raise NotReady("the key broker's answer is malformed") from None
    return ReleasedKeys(
        record_keys=dict(payload.record_keys), active_record_key=payload.active,
        model_key=payload.model_key,
        inference_key=X25519PrivateKey.from_private_bytes(payload.inference_key))
