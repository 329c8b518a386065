"""The worker's side of key release: fresh key pair, nonce, evidence, sealed keys."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml_serve.crypto.attestation.base import AttestationRefused, Provider, report_data
from ppml_serve.crypto.sealed_box import open_sealed, public_bytes
from ppml_serve.errors import NotReady
from ppml_serve.keybroker.service import RELEASE_INFO


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
            nonce = http.post("/v1/nonce").json()["nonce"]
            evidence = provider.evidence(measurement, report_data(public_key, nonce), nonce)
            response = http.post("/v1/release", json={
                "provider": provider.name, "evidence": evidence,
                "public_key": base64.b64encode(public_key).decode(), "model": model,
                "nonce": nonce,
                "model_key": base64.b64encode(model_key).decode() if model_key else None})
    except httpx.HTTPError as exc:
        raise NotReady(f"key broker unreachable at {broker_url} ({type(exc).__name__})") from None
    if response.status_code == 403:
        raise AttestationRefused(response.json().get("error", "key release refused"))
    if response.status_code != 200:
        raise NotReady(f"key broker answered {response.status_code}")
    payload = json.loads(open_sealed(ephemeral, base64.b64decode(
        response.json()["sealed_keys"]), RELEASE_INFO))
    return ReleasedKeys(
        record_keys={k: base64.b64decode(v) for k, v in payload["record_keys"].items()},
        active_record_key=payload["active"],
        model_key=base64.b64decode(payload["model_key"]) if payload["model_key"] else None,
        inference_key=X25519PrivateKey.from_private_bytes(
            base64.b64decode(payload["inference_key"])),
    )
