"""Real TEE evidence: genuine Intel SGX/TDX quotes and an AMD SEV-SNP report (test vectors in
``../shared/fixtures/tee/``, verified at the times their README gives), and quotes from the
project's TEST PKI (``test_pki``: a declared stand-in for Intel's PKI and a quoting enclave,
which cannot run here) through the real verifier and the key broker's full release path."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims, report_data
from ppml_serve.crypto.attestation.dcap import DcapVerifier, evidence_document
from ppml_serve.crypto.attestation.policy import Policy, Release
from ppml_serve.crypto.attestation.snp import SnpVerifier
from ppml_serve.crypto.attestation.test_pki import TestPki
from ppml_serve.crypto.envelope import REQUEST, Keyring, associated_data
from ppml_serve.crypto.keystore import DataKeyTable
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.sealed_box import open_sealed, public_bytes
from ppml_serve.errors import IntegrityError
from ppml_serve.keybroker.service import RELEASE_INFO, InferenceKeys, KeyBroker, ReleaseRequest

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "tee"
SGX_AT, TDX_AT, OUTDATED_AT = 1750334171, 1750331763, 1771415931
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MRTD = ("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b"
        "2538873118b7")
SNP_MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5"
                   "a608eb0cf2e4872b01")

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(),
                                    reason=f"TEE test vectors not found at {FIXTURES}")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def collateral(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture(name))
    return loaded


def flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


# --- genuine Intel quotes -------------------------------------------------------------------

@needs_fixtures
def test_genuine_sgx_quote_verifies_with_its_measurements_and_status() -> None:
    claims = DcapVerifier().verify_quote(fixture("sgx_quote"),
                                         collateral("sgx_quote_collateral.json"), SGX_AT)
    assert (claims.tee, claims.measurement) == ("sgx", MRENCLAVE)
    assert claims.measurements["mrsigner"] == MRSIGNER
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert bytes.fromhex(claims.report_data).startswith(b"Hello, world!")
    assert claims.hardware_protected and not claims.test_root
    # The default policy takes only UpToDate platforms, and says which status it saw.
    with pytest.raises(AttestationRefused, match="ConfigurationAndSWHardeningNeeded"):
        Policy().check_tcb(claims, SGX_AT)
    Policy(allowed_tcb_statuses=["ConfigurationAndSWHardeningNeeded"]).check_tcb(claims, SGX_AT)
    with pytest.raises(AttestationRefused, match="affected by INTEL-SA-00615"):
        Policy(allowed_tcb_statuses=["ConfigurationAndSWHardeningNeeded"],
               refused_advisories=["INTEL-SA-00615"]).check_tcb(claims, SGX_AT)


@needs_fixtures
def test_genuine_tdx_quote_verifies_up_to_date() -> None:
    claims = DcapVerifier().verify_quote(fixture("tdx_quote"),
                                         collateral("tdx_quote_collateral.json"), TDX_AT)
    assert (claims.tee, claims.measurement, claims.tcb_status) == ("tdx", MRTD, "UpToDate")
    assert claims.report_data.startswith("9a9d48e7f6799642d3d1b34e1e5e1742")
    assert set(claims.measurements) >= {"rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    Policy().check_tcb(claims, TDX_AT)
    with pytest.raises(AttestationRefused, match=r"issued 1 days ago, more than the policy's 0\.5"):
        Policy(max_collateral_age_days=0.5).check_tcb(claims, TDX_AT + 86400)


@needs_fixtures
@pytest.mark.parametrize("quote", ["sgx_quote", "tdx_quote"])
def test_genuine_quotes_are_refused_today_because_their_collateral_expired(quote: str) -> None:
    with pytest.raises(AttestationRefused, match="collateral expired"):
        DcapVerifier().verify_quote(fixture(quote), collateral(f"{quote}_collateral.json"))


@needs_fixtures
def test_outdated_tdx_platform_is_refused() -> None:
    with pytest.raises(AttestationRefused, match="No matching TCB level"):
        DcapVerifier().verify_quote(fixture("tdx_quote_outdated"),
                                    collateral("tdx_quote_outdated_collateral.json"), OUTDATED_AT)


@needs_fixtures
@pytest.mark.parametrize(("quote", "at", "offset", "field"), [
    ("sgx_quote", SGX_AT, 48 + 320, "report_data"),
    ("sgx_quote", SGX_AT, 48 + 64, "MRENCLAVE"),
    ("sgx_quote", SGX_AT, 8, "header"),
    ("tdx_quote", TDX_AT, 48 + 520, "report_data"),
    ("tdx_quote", TDX_AT, 48 + 136, "MRTD"),
])
def test_a_flipped_bit_in_a_signed_field_is_refused(quote: str, at: int, offset: int,
                                                    field: str) -> None:
    raw = fixture(quote)
    DcapVerifier().verify_quote(raw, collateral(f"{quote}_collateral.json"), at)
    with pytest.raises(AttestationRefused, match="ISV enclave report signature is invalid"):
        DcapVerifier().verify_quote(flip(raw, offset), collateral(f"{quote}_collateral.json"), at)


@needs_fixtures
def test_edited_tcb_info_is_refused() -> None:
    edited = collateral("tdx_quote_collateral.json")
    edited["tcb_info"] = edited["tcb_info"].replace('"issueDate":"2025-06-19',
                                                    '"issueDate":"2025-06-18', 1)
    assert edited["tcb_info"] != collateral("tdx_quote_collateral.json")["tcb_info"]
    with pytest.raises(AttestationRefused, match="Signature is invalid"):
        DcapVerifier().verify_quote(fixture("tdx_quote"), edited, TDX_AT)


# --- genuine AMD SEV-SNP report -------------------------------------------------------------

def snp_evidence(report: bytes | None = None, **certs: bytes) -> str:
    parts = {"report": report if report is not None else fixture("snp/attestation.bin"),
             "vcek": fixture("snp/kds_vcek.der"), "ask": fixture("snp/milan_ask.der"),
             "ark": fixture("snp/milan_ark.der"), **certs}
    return json.dumps({name: base64.b64encode(value).decode() for name, value in parts.items()})


@needs_fixtures
def test_genuine_snp_report_chain_and_signature_verify_and_debug_is_refused() -> None:
    claims = SnpVerifier().verify(snp_evidence())
    assert (claims.tee, claims.measurement) == ("snp", SNP_MEASUREMENT)
    assert claims.measurements["product"] == "Milan"
    assert (claims.measurements["tcb_bootloader"], claims.measurements["tcb_snp"],
            claims.measurements["tcb_microcode"]) == ("2", "5", "68")
    assert claims.report_data.startswith("0102030405" + "00" * 10)
    assert claims.debug  # guest policy bit 19
    with pytest.raises(AttestationRefused, match="debug"):
        Policy(allowed_providers=["snp"], allowed_measurements=[SNP_MEASUREMENT]).check(
            claims, claims.issued_at)
    Policy(allowed_providers=["snp"], allow_debug=True,
           allowed_measurements=[SNP_MEASUREMENT]).check(claims, claims.issued_at)


@needs_fixtures
@pytest.mark.parametrize(("offset", "field"), [(0x50, "report_data"), (0x90, "measurement"),
                                               (0x08, "policy"), (0x1A0, "chip_id")])
def test_snp_flipped_bit_is_refused(offset: int, field: str) -> None:
    with pytest.raises(AttestationRefused, match=r"signature is not valid|another chip"):
        SnpVerifier().verify(snp_evidence(flip(fixture("snp/attestation.bin"), offset)))


@needs_fixtures
def test_snp_chain_must_end_at_a_pinned_ark() -> None:
    with pytest.raises(AttestationRefused, match="not one of AMD's pinned root keys"):
        SnpVerifier().verify(snp_evidence(ark=fixture("snp/milan_ask.der")))
    with pytest.raises(AttestationRefused, match="ASK certificate is not signed"):
        SnpVerifier().verify(snp_evidence(ask=fixture("snp/kds_vcek.der")))


# --- the project's test PKI through the real verifier ---------------------------------------

@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.generate()


def test_pki_quote_verifies_only_against_its_own_root(pki: TestPki) -> None:
    quote = pki.quote(bytes(64), b"\x42" * 32)
    claims = DcapVerifier(test_root_der=pki.root_der).verify_quote(quote, pki.collateral())
    assert (claims.measurement, claims.tcb_status) == ("42" * 32, "UpToDate")
    assert claims.test_root and not claims.hardware_protected
    with pytest.raises(AttestationRefused, match="signed by a ppml-serve TEST PKI, not Intel"):
        DcapVerifier().verify_quote(quote, pki.collateral())  # Intel's pinned root
    with pytest.raises(AttestationRefused, match="TEST root"):
        Policy(allowed_measurements=["42" * 32]).check(claims, claims.issued_at)
    other = TestPki.generate()
    with pytest.raises(AttestationRefused, match="root CA CRL"):
        DcapVerifier(test_root_der=other.root_der).verify_quote(quote, pki.collateral())


def test_test_pki_round_trips_through_its_state_files(pki: TestPki, tmp_path: Path) -> None:
    pki.save(tmp_path)
    assert oct((tmp_path / "test-pki-keys.pem").stat().st_mode & 0o777) == "0o600"
    loaded = TestPki.load(tmp_path)
    quote = loaded.quote(bytes(64), b"\x01" * 32)
    DcapVerifier(test_root_der=pki.root_der).verify_quote(quote, loaded.collateral())
    assert "NO HARDWARE" in repr(loaded)


class Broker:
    """A key broker over a local KMS that verifies test-PKI quotes, with two models."""

    def __init__(self, tmp_path: Path, pki: TestPki, **policy: Any) -> None:
        self.kms = LocalKMS.create(tmp_path / "kms", SecretStr("pass"))
        self.table = DataKeyTable.create(tmp_path / "kms" / "data-keys.json", self.kms)
        self.pki = pki
        self.policy = Policy(allow_test_root=True, releases=[
            Release(measurement="aa" * 32, model="demo", model_sha256="1" * 64, tee="sgx"),
            Release(measurement="bb" * 32, model="enc", model_sha256="2" * 64)], **policy)
        self.service = KeyBroker(self.kms, self.table.unwrap_all(self.kms), self.table.active,
                                 self.policy, {"dcap": DcapVerifier(test_root_der=pki.root_der)},
                                 InferenceKeys(tmp_path / "kms" / "inference.json", self.kms))

    def request(self, model: str = "demo", measurement: str = "aa" * 32, *,
                quote_key: bytes | None = None, nonce: str | None = None,
                collateral: dict[str, Any] | None = None, debug: bool = False,
                pki: TestPki | None = None) -> tuple[ReleaseRequest, X25519PrivateKey]:
        key = X25519PrivateKey.generate()
        nonce = nonce or self.service.issue_nonce()
        bound = quote_key if quote_key is not None else public_bytes(key)
        quote = (pki or self.pki).quote(bytes.fromhex(report_data(bound, nonce)) + bytes(32),
                                        bytes.fromhex(measurement), debug=debug)
        evidence = evidence_document(quote, collateral or (pki or self.pki).collateral())
        return ReleaseRequest("dcap", evidence, public_bytes(key), model, nonce=nonce), key


def released(request: ReleaseRequest, key: X25519PrivateKey, broker: Broker) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(open_sealed(key, broker.service.release(request),
                                                     RELEASE_INFO))
    return payload


def test_a_test_pki_worker_gets_exactly_its_models_record_keys(tmp_path: Path,
                                                               pki: TestPki) -> None:
    broker = Broker(tmp_path, pki)
    payload = released(*broker.request(), broker)
    worker = Keyring({k: base64.b64decode(v) for k, v in payload["record_keys"].items()},
                     payload["active"])
    gateway = broker.table.keyring(broker.kms)
    aad = associated_data("demo", "r1", REQUEST)
    assert worker.open(gateway.for_model("demo").seal(b"x-ray", aad), aad) == b"x-ray"
    # Another model's records (and job answers) do not open with demo's keys.
    other = associated_data("enc", "r1", REQUEST)
    with pytest.raises(IntegrityError):
        worker.open(gateway.for_model("enc").seal(b"enc's input", other), other)
    with pytest.raises(IntegrityError):  # nor do records under the undivided record keys
        worker.open(gateway.seal(b"raw", aad), aad)
    raw = {base64.b64encode(v).decode() for v in broker.table.unwrap_all(broker.kms).values()}
    assert not raw & set(payload["record_keys"].values())


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("unlisted measurement", {"measurement": "cc" * 32}, "not allowed by the policy"),
    ("another model's keys", {"model": "enc"}, r"may receive keys for \['demo'\]"),
    ("key not bound by report_data", {"quote_key": b"\x07" * 32}, "does not bind"),
    ("debug enclave", {"debug": True}, "debug SGX enclave"),
]


@pytest.mark.parametrize(("case", "change", "reason"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_each_refusal_names_its_reason(tmp_path: Path, pki: TestPki, case: str,
                                       change: dict[str, Any], reason: str) -> None:
    broker = Broker(tmp_path, pki)
    request, _ = broker.request(**change)
    with pytest.raises(AttestationRefused, match=reason):
        broker.service.release(request)


def test_replayed_nonce_and_unknown_nonce_are_refused(tmp_path: Path, pki: TestPki) -> None:
    broker = Broker(tmp_path, pki)
    request, key = broker.request()
    released(request, key, broker)
    with pytest.raises(AttestationRefused, match="already used"):
        broker.service.release(request)
    forged, _ = broker.request(nonce="made-up")
    with pytest.raises(AttestationRefused, match="nonce unknown"):
        broker.service.release(forged)


@pytest.mark.parametrize(("collateral", "reason"), [
    ({"revoke_pck": True}, "Failed to verify certificate chain"),
    ({"tcb_status": "OutOfDate", "advisories": ("INTEL-SA-00001",)},
     r"TCB status is OutOfDate \(INTEL-SA-00001\)"),
    ({"tcb_status": "Revoked"}, "TCB status is invalid: Revoked"),
])
def test_platform_refusals(tmp_path: Path, pki: TestPki, collateral: dict[str, Any],
                           reason: str) -> None:
    broker = Broker(tmp_path, pki)
    request, _ = broker.request(collateral=pki.collateral(**collateral))
    with pytest.raises(AttestationRefused, match=reason):
        broker.service.release(request)


def test_expired_collateral_and_another_test_root_are_refused(tmp_path: Path,
                                                              pki: TestPki) -> None:
    broker = Broker(tmp_path, pki)
    stale = pki.collateral(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60))
    request, _ = broker.request(collateral=stale)
    with pytest.raises(AttestationRefused, match="expired"):
        broker.service.release(request)
    stranger = TestPki.generate()
    request, _ = broker.request(pki=stranger)
    with pytest.raises(AttestationRefused, match="root CA CRL"):
        broker.service.release(request)


def test_typed_release_fields_must_all_match() -> None:
    claims = Claims("dcap", "aa" * 32, "", 0.0, False, tee="tdx",
                    measurements={"mrtd": "aa" * 32, "rtmr0": "01", "rtmr1": "02",
                                  "rtmr2": "03", "rtmr3": "04"})
    entry = Release(measurement="aa" * 32, model="m", model_sha256="0" * 64, tee="tdx",
                    rtmr=["01", "02", "03", "04"])
    assert entry.mismatch(claims) is None
    assert entry.model_copy(update={"rtmr": ["01", "02", "03", "05"]}).mismatch(claims) \
        == "rtmr3 differs"
    assert entry.model_copy(update={"tee": "sgx"}).mismatch(claims) == \
        "the entry is for SGX evidence"
    with pytest.raises(ValueError, match="needs 'measurement'"):
        Release(model="m", model_sha256="0" * 64)


# --- the operator's command ---------------------------------------------------------------

def F(name: str) -> str:
    return str(FIXTURES / name)


SGX_TIME, TDX_TIME = "2025-06-19T11:56:11Z", "2025-06-19T11:16:03Z"


@needs_fixtures
@pytest.mark.parametrize(("args", "code", "says"), [
    ([F("tdx_quote"), "--collateral", F("tdx_quote_collateral.json"), "--at", TDX_TIME], 0,
     "accepted by the policy"),
    ([F("tdx_quote"), "--collateral", F("tdx_quote_collateral.json")], 1, "collateral expired"),
    ([F("sgx_quote"), "--collateral", F("sgx_quote_collateral.json"), "--at", SGX_TIME], 1,
     "TCB status is ConfigurationAndSWHardeningNeeded"),
    ([F("snp/attestation.bin"), "--collateral", F("snp/kds_vcek.der"),
      "--ask", F("snp/milan_ask.der"), "--ark", F("snp/milan_ark.der")], 1, "debug"),
    ([F("snp/attestation.bin")], 2, "needs --collateral VCEK.der"),
])
def test_attest_verify_command(args: list[str], code: int, says: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from ppml_serve.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["attest", "verify", *args])
    captured = capsys.readouterr()
    assert exited.value.code == code
    assert says in captured.out + captured.err


@needs_fixtures
@pytest.mark.parametrize(("evidence", "extra"), [
    ("tdx_quote", ["--collateral", F("tdx_quote_collateral.json"), "--at", TDX_TIME]),
    ("sgx_quote", ["--collateral", F("sgx_quote_collateral.json"), "--at", SGX_TIME]),
    ("snp/attestation.bin", ["--collateral", F("snp/kds_vcek.der"),
                             "--ask", F("snp/milan_ask.der"), "--ark", F("snp/milan_ark.der")]),
])
def test_attest_measure_writes_an_entry_that_matches_the_tee(evidence: str, extra: list[str],
                                                             tmp_path: Path) -> None:
    from ppml_serve.cli.attest_commands import _judge, _when, hardware_entry

    args = dict(zip(extra[::2], extra[1::2], strict=True))
    def read(flag: str) -> bytes | None:
        return Path(args[flag]).read_bytes() if flag in args else None
    def path(flag: str) -> Path | None:
        return Path(args[flag]) if flag in args else None
    entry = hardware_entry(Path(F(evidence)), path("--collateral"), path("--ask"),
                           path("--ark"), args.get("--at"))
    release = Release.model_validate({"model": "demo", "model_sha256": "0" * 64, **entry})
    claims = _judge(fixture(evidence), read("--collateral"), read("--ask"), read("--ark"),
                    _when(args.get("--at")), None)
    assert release.mismatch(claims) is None and release.tee == claims.tee
