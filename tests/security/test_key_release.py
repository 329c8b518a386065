"""Key release is bound to the attested model: a worker attested for one model gets nothing
of another's, an audit line records each decision, and a KMS outage is 503, not 403."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr
from starlette.testclient import TestClient

from ppml_serve.crypto.attestation.base import AttestationRefused, report_data
from ppml_serve.crypto.attestation.policy import Policy, Release, key_fingerprint
from ppml_serve.crypto.attestation.simulated import (
    SimulatedProvider,
    SimulatedVerifier,
    ensure_platform_key,
)
from ppml_serve.crypto.keystore import DataKeyTable
from ppml_serve.crypto.kms.base import DataKey
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.sealed_box import public_bytes
from ppml_serve.errors import KMSUnavailable
from ppml_serve.keybroker.app import create_app
from ppml_serve.keybroker.service import InferenceKeys, KeyBroker, ReleaseRequest

DEMO, OTHER = "d" * 64, "e" * 64


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.kms = LocalKMS.create(tmp_path / "kms", SecretStr("pass"))
        table = DataKeyTable.create(tmp_path / "kms" / "data-keys.json", self.kms)
        ensure_platform_key(tmp_path / "att")
        self.demo_key: DataKey = self.kms.generate_data_key()
        self.other_key: DataKey = self.kms.generate_data_key()
        policy = Policy(allowed_providers=["simulated"], allow_debug=True, releases=[
            Release(measurement=DEMO, model="demo", model_sha256="1" * 64,
                    model_key_sha256=key_fingerprint(self.demo_key.wrapped)),
            Release(measurement=OTHER, model="other", model_sha256="2" * 64,
                    model_key_sha256=key_fingerprint(self.other_key.wrapped))])
        self.broker = KeyBroker(self.kms, table.unwrap_all(self.kms), table.active, policy,
                                {"simulated": SimulatedVerifier.from_directory(tmp_path / "att")},
                                InferenceKeys(tmp_path / "kms" / "inference.json", self.kms))
        self.provider = SimulatedProvider(tmp_path / "att")

    def request(self, measurement: str, model: str, model_key: bytes | None) -> ReleaseRequest:
        key = X25519PrivateKey.generate()
        nonce = self.broker.issue_nonce()
        evidence = self.provider.evidence(measurement, report_data(public_bytes(key), nonce),
                                          nonce)
        return ReleaseRequest("simulated", evidence, public_bytes(key), model, model_key,
                              peer="10.0.0.7")


def test_worker_attested_for_one_model_gets_nothing_of_another(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup(tmp_path)
    caplog.set_level(logging.INFO, "ppml_serve.audit")
    with pytest.raises(AttestationRefused, match=r"may receive keys for \['demo'\], not for"):
        setup.broker.release(setup.request(DEMO, "other", setup.other_key.wrapped))
    with pytest.raises(AttestationRefused, match=r"may receive keys for \['demo'\]"):
        setup.broker.release(setup.request(DEMO, "other", None))  # its end-to-end key either
    with pytest.raises(AttestationRefused, match="not the one bound to model 'demo'"):
        setup.broker.release(setup.request(DEMO, "demo", setup.other_key.wrapped))
    assert setup.broker.release(setup.request(DEMO, "demo", setup.demo_key.wrapped))
    lines = [r.getMessage() for r in caplog.records if r.name == "ppml_serve.audit"]
    assert len(lines) == 4
    assert lines[0].startswith("key release refused: model='other' measurement=" + DEMO)
    assert "provider=simulated peer=10.0.0.7" in lines[0]
    assert lines[3].startswith("key release released: model='demo'")
    for secret in (setup.demo_key.plaintext, setup.other_key.plaintext,
                   setup.demo_key.wrapped, setup.other_key.wrapped):
        for encoded in (secret.hex(), base64.b64encode(secret).decode()):
            assert not any(encoded in line for line in lines), "key material in the audit log"


def test_a_flat_measurement_list_releases_nothing(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.broker._policy = Policy(allowed_providers=["simulated"], allow_debug=True,
                                  allowed_measurements=[DEMO])
    with pytest.raises(AttestationRefused, match="not bound to any model"):
        setup.broker.release(setup.request(DEMO, "demo", None))


class OutageKMS:
    """The local KMS with its unwrap failing as an unreachable KMIP/AWS KMS does."""

    def __init__(self, kms: LocalKMS) -> None:
        self._kms = kms

    def unwrap(self, wrapped: bytes) -> bytes:
        raise KMSUnavailable("KMIP server unreachable (ConnectionRefusedError)")

    def __getattr__(self, name: str) -> object:
        return getattr(self._kms, name)


def test_kms_outage_is_503_with_retry_after_not_a_refusal(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.broker._kms = OutageKMS(setup.kms)  # type: ignore[assignment]
    request = setup.request(DEMO, "demo", setup.demo_key.wrapped)
    with TestClient(create_app(setup.broker)) as http:
        response = http.post("/v1/release", json={
            "provider": request.provider, "evidence": request.evidence,
            "public_key": base64.b64encode(request.public_key).decode(), "model": "demo",
            "model_key": base64.b64encode(setup.demo_key.wrapped).decode()})
        malformed = http.post("/v1/release", json=[1, 2])
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "unavailable" in response.json()["error"]
    assert malformed.status_code == 400


def test_kms_unwraps_each_key_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found from outside: three synchronous KMS unwraps per release. Now each wrapped key
    (the model's file key, its end-to-end key) is unwrapped once per broker process."""
    setup = Setup(tmp_path)
    calls: list[int] = []
    unwrap = setup.kms.unwrap
    monkeypatch.setattr(setup.kms, "unwrap", lambda wrapped: calls.append(1) or unwrap(wrapped))
    for _ in range(3):
        assert setup.broker.release(setup.request(DEMO, "demo", setup.demo_key.wrapped))
    assert len(calls) == 2
