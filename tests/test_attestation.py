"""Key release: evidence checked against the policy; wrong measurement, replay, staleness and
unbound keys refused; JWT attestation tokens verified against published signing keys."""

from __future__ import annotations

import base64
import datetime
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from ppml_serve.crypto.attestation.base import AttestationRefused, report_data
from ppml_serve.crypto.attestation.jwt_token import JwtVerifier
from ppml_serve.crypto.attestation.policy import Policy, Release, key_fingerprint
from ppml_serve.crypto.attestation.simulated import (
    SimulatedProvider,
    SimulatedVerifier,
    ensure_platform_key,
)
from ppml_serve.crypto.keystore import DataKeyTable
from ppml_serve.crypto.kms.base import DataKey
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.sealed_box import open_sealed, public_bytes
from ppml_serve.keybroker.service import RELEASE_INFO, InferenceKeys, KeyBroker, ReleaseRequest

GOOD = "a" * 64
ISSUER = "https://ppml-test.attest.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


MODEL_KEYS: dict[Path, DataKey] = {}
"""The encrypted model's file key bound in each test's policy."""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[KeyBroker, SimulatedProvider, Clock, LocalKMS]:
    kms = LocalKMS.create(tmp_path / "kms", SecretStr("pass"))
    table = DataKeyTable.create(tmp_path / "kms" / "data-keys.json", kms)
    ensure_platform_key(tmp_path / "att")
    clock = Clock()
    MODEL_KEYS[tmp_path] = kms.generate_data_key()
    policy = Policy(allowed_providers=["simulated"], allow_debug=True, max_evidence_age_s=60,
                    releases=[Release(measurement=GOOD, model="demo", model_sha256="0" * 64,
                                      model_key_sha256=key_fingerprint(
                                          MODEL_KEYS[tmp_path].wrapped))])
    broker = KeyBroker(kms, table.unwrap_all(kms), table.active, policy,
                       {"simulated": SimulatedVerifier.from_directory(tmp_path / "att")},
                       InferenceKeys(tmp_path / "kms" / "inference.json", kms), clock=clock)
    return broker, SimulatedProvider(tmp_path / "att", clock=clock), clock, kms


def attest(broker: KeyBroker, provider: SimulatedProvider, measurement: str = GOOD,
           model_key: bytes | None = None) -> tuple[ReleaseRequest, X25519PrivateKey]:
    key = X25519PrivateKey.generate()
    nonce = broker.issue_nonce()
    evidence = provider.evidence(measurement, report_data(public_bytes(key), nonce), nonce)
    return ReleaseRequest("simulated", evidence, public_bytes(key), "demo", model_key), key


def test_allowed_worker_receives_its_keys_sealed_to_it(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, provider, _, _ = setup
    model_key = MODEL_KEYS[tmp_path]
    request, key = attest(broker, provider, model_key=model_key.wrapped)
    sealed = broker.release(request)
    payload = json.loads(open_sealed(key, sealed, RELEASE_INFO))
    assert payload["model_key"] and payload["record_keys"][payload["active"]]
    assert base64.b64decode(payload["model_key"]) == model_key.plaintext
    with pytest.raises(Exception):  # noqa: B017 - anyone else cannot open it
        open_sealed(X25519PrivateKey.generate(), sealed, RELEASE_INFO)


def test_wrong_measurement_gets_nothing_and_says_why(setup) -> None:  # type: ignore[no-untyped-def]
    broker, provider, _, _ = setup
    request, _ = attest(broker, provider, measurement="b" * 64)
    with pytest.raises(AttestationRefused, match=r"measurement .* not allowed"):
        broker.release(request)


def test_replayed_evidence_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    broker, provider, _, _ = setup
    request, _ = attest(broker, provider)
    broker.release(request)
    with pytest.raises(AttestationRefused, match="replayed"):
        broker.release(request)


def test_stale_evidence_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    broker, provider, clock, _ = setup
    request, _ = attest(broker, provider)
    clock.now += 120
    with pytest.raises(AttestationRefused, match=r"expired|stale"):
        broker.release(request)


def test_evidence_for_another_key_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    broker, provider, _, _ = setup
    request, _ = attest(broker, provider)
    stolen = ReleaseRequest(request.provider, request.evidence,
                            public_bytes(X25519PrivateKey.generate()), "demo")
    with pytest.raises(AttestationRefused, match="does not bind"):
        broker.release(stolen)


def test_forged_signature_is_refused(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker, _, clock, _ = setup
    ensure_platform_key(tmp_path / "rogue")
    request, _ = attest(broker, SimulatedProvider(tmp_path / "rogue", clock=clock))
    with pytest.raises(AttestationRefused, match="signature"):
        broker.release(request)


def test_default_production_policy_refuses_simulation(setup) -> None:  # type: ignore[no-untyped-def]
    _, provider, clock, _ = setup
    key = X25519PrivateKey.generate()
    evidence = provider.evidence(GOOD, report_data(public_bytes(key), "n"), "n")
    parsed = json.loads(base64.urlsafe_b64decode(evidence.split(".")[0] + "=="))
    assert parsed["warning"].startswith("simulated attestation: no hardware protection")
    from ppml_serve.crypto.attestation.base import Claims

    with pytest.raises(AttestationRefused, match="provider 'simulated' is not allowed"):
        Policy().check(Claims("simulated", GOOD, "", clock.now, True), clock.now)


# --- attestation tokens (JWT), signed by a test key standing in for the service -------------

@pytest.fixture
def service_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(key: rsa.RSAPrivateKey) -> dict[str, object]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": "service-1", "alg": "RS256", "use": "sig"}]}


def token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "iat": now, "exp": now + 300, "x-ms-sgx-mrenclave": GOOD,
            "x-ms-sgx-report-data": "11" * 32 + "00" * 32, "x-ms-sgx-is-debuggable": False}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "service-1"})


def test_jwt_token_verified_against_published_keys(service_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(jwks(service_key), ISSUER)
    claims = verifier.verify(token(service_key))
    assert claims.measurement == GOOD and claims.report_data == "11" * 32 + "00" * 32
    assert claims.hardware_protected and not claims.debug
    Policy(allowed_measurements=[GOOD]).check(claims, time.time())


@pytest.mark.parametrize(("change", "reason"), [
    ({"iss": "https://evil.example"}, "untrusted issuer"),
    ({"exp": int(time.time()) - 10}, "expired"),
])
def test_jwt_bad_claims_refused(service_key: rsa.RSAPrivateKey, change: dict[str, object],
                                reason: str) -> None:
    with pytest.raises(AttestationRefused, match=reason):
        JwtVerifier(jwks(service_key), ISSUER).verify(token(service_key, **change))


def test_jwt_signed_by_unpublished_key_refused(service_key: rsa.RSAPrivateKey) -> None:
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AttestationRefused, match="not valid"):
        JwtVerifier(jwks(service_key), ISSUER).verify(token(rogue))


def test_debug_enclave_refused_by_production_policy(service_key: rsa.RSAPrivateKey) -> None:
    claims = JwtVerifier(jwks(service_key), ISSUER).verify(
        token(service_key, **{"x-ms-sgx-is-debuggable": True}))
    with pytest.raises(AttestationRefused, match="debug"):
        Policy(allowed_measurements=[GOOD]).check(claims, time.time())


def x5c_only(key: rsa.RSAPrivateKey) -> dict[str, object]:
    """A JWKS entry as Azure Attestation publishes it: the key only as a certificate."""
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "attestation service")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"keys": [{"kid": "broken", "kty": "RSA", "n": "!!"},
                     {"kid": "service-1", "kty": "RSA", "x5c": [base64.b64encode(der).decode()]}]}


def test_jwks_with_only_x5c_certificates_and_ps384(service_key: rsa.RSAPrivateKey) -> None:
    """Found from outside: PyJWK refused x5c-only entries and the error escaped the
    constructor; PS384 was not accepted."""
    verifier = JwtVerifier(x5c_only(service_key), ISSUER)  # the broken entry is skipped
    now = int(time.time())
    body = {"iss": ISSUER, "iat": now, "exp": now + 300, "x-ms-sgx-mrenclave": GOOD,
            "x-ms-sgx-report-data": "11" * 64}
    signed = jwt.encode(body, service_key, algorithm="PS384", headers={"kid": "service-1"})
    claims = verifier.verify(signed)
    assert claims.measurement == GOOD and claims.report_data == "11" * 32
    with pytest.raises(AttestationRefused, match="no usable key"):
        JwtVerifier({"keys": [{"kid": "broken", "kty": "RSA", "n": "!!"}]}, ISSUER)


def test_intel_trust_authority_nested_claims(service_key: rsa.RSAPrivateKey) -> None:
    mrtd = "ab" * 48
    claims = JwtVerifier(jwks(service_key), ISSUER).verify(token(
        service_key, **{"x-ms-sgx-mrenclave": None},
        tdx={"tdx_mrtd": mrtd, "tdx_report_data": "22" * 32 + "00" * 32,
             "tdx_is_debuggable": False}, attester_tcb_status="OutOfDate"))
    assert (claims.tee, claims.measurement, claims.tcb_status) == ("tdx", mrtd, "OutOfDate")
    with pytest.raises(AttestationRefused, match="TCB status is OutOfDate"):
        Policy(allowed_measurements=[mrtd]).check(claims, time.time())
    Policy(allowed_measurements=[mrtd], allowed_tcb_statuses=["UpToDate", "OutOfDate"]).check(
        claims, time.time())
