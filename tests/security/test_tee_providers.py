"""Worker attestation providers against the documented file interfaces (Gramine's
/dev/attestation, Linux configfs-tsm). No TEE runs here: ``FakeTree`` is a DECLARED STAND-IN
for those kernel/enclave pseudo-files that enforces their rules (exactly 64 bytes of inblob,
a generation counter per write, provider names) and answers with a TEST-PKI quote bound to
what was written, so the quote then goes through the real verifier."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from pathlib import Path

import pytest

from ppml_serve.crypto.attestation.base import AttestationRefused, report_data
from ppml_serve.crypto.attestation.collateral import CollateralStore
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.providers import (
    GramineProvider,
    TsmProvider,
    auto_provider,
    snp_certificates,
)
from ppml_serve.crypto.attestation.snp import SnpVerifier
from ppml_serve.crypto.attestation.test_pki import FMSPC, TestPki
from ppml_serve.errors import ConfigError

from .test_tee_evidence import FIXTURES, fixture, needs_fixtures

TSM = Path("/sys/kernel/config/tsm/report")
GRAMINE = Path("/dev/attestation")
PUBLIC_KEY, NONCE = b"\x05" * 32, "nonce-1"


class FakeTree:
    """Stand-in for configfs-tsm and Gramine's pseudo-files (see the module docstring)."""

    def __init__(self, pki: TestPki, provider: str = "tdx_guest", race: int = 0,
                 gramine_type: str | None = None, snp_out: bytes = b"",
                 auxblob: bytes = b"") -> None:
        self.pki, self.provider, self.race = pki, provider, race
        self.gramine_type, self.snp_out, self.auxblob = gramine_type, snp_out, auxblob
        self.reports: dict[Path, dict[str, bytes | int]] = {}
        self.user_report_data = b""
        self.made = self.removed = 0

    def exists(self, path: Path) -> bool:
        if path == TSM:
            return self.provider != ""
        return self.gramine_type is not None and path in (GRAMINE / "quote", GRAMINE)

    def mkdir(self, path: Path) -> None:
        if path.parent != TSM or path in self.reports:
            raise FileExistsError(path)
        self.reports[path] = {"generation": 0, "outblob": b""}
        self.made += 1

    def rmdir(self, path: Path) -> None:
        del self.reports[path]
        self.removed += 1

    def _quote(self, data: bytes) -> bytes:
        return self.pki.quote(data, b"\x33" * 32)

    def write(self, path: Path, data: bytes) -> None:
        if path == GRAMINE / "user_report_data":
            if len(data) != 64:
                raise OSError(22, "user_report_data takes exactly 64 bytes")
            self.user_report_data = data
            return
        report = self.reports[path.parent]
        if path.name != "inblob" or len(data) > 64:
            raise OSError(22, f"{path.name}: invalid write")
        generation = int(report["generation"]) + 1
        if self.race:  # another process wrote inblob too
            self.race -= 1
            generation += 1
        report["generation"] = generation
        report["outblob"] = self.snp_out if self.provider == "sev_guest" else self._quote(data)

    def read(self, path: Path) -> bytes:
        if path.parent == GRAMINE:
            if path.name == "attestation_type" and self.gramine_type is not None:
                return self.gramine_type.encode()
            if path.name == "quote" and self.user_report_data:
                return self._quote(self.user_report_data)
            raise FileNotFoundError(path)
        report = self.reports[path.parent]
        if path.name == "provider":
            return self.provider.encode() + b"\n"
        if path.name == "generation":
            return str(report["generation"]).encode()
        if path.name == "auxblob":
            return self.auxblob
        value = report[path.name]
        return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.generate()


@pytest.fixture()
def verifier(pki: TestPki, tmp_path: Path) -> DcapVerifier:
    """The broker's verifier: hardware providers send the quote alone, so the collateral
    comes from its cache (filled here with the test PKI's, as 'collateral fetch' would)."""
    store = CollateralStore(tmp_path / "collateral")
    store.put("sgx", FMSPC.hex(), pki.collateral())
    return DcapVerifier(store, test_root_der=pki.root_der)


def test_tdx_through_configfs_tsm_gives_a_quote_bound_to_the_key(
        pki: TestPki, verifier: DcapVerifier) -> None:
    tree = FakeTree(pki)
    provider = TsmProvider("tdx", tree, TSM)
    evidence = provider.evidence("ignored", report_data(PUBLIC_KEY, NONCE), NONCE)
    claims = verifier.verify(evidence)
    assert claims.binds(PUBLIC_KEY, NONCE) and not claims.binds(b"\x06" * 32, NONCE)
    assert provider.name == "dcap" and tree.made == tree.removed == 1


def test_a_raced_generation_is_retried_and_never_returned(pki: TestPki,
                                                          verifier: DcapVerifier) -> None:
    tree = FakeTree(pki, race=2)
    evidence = TsmProvider("tdx", tree, TSM).evidence("", report_data(PUBLIC_KEY, NONCE), NONCE)
    assert verifier.verify(evidence).binds(PUBLIC_KEY, NONCE)
    assert tree.made == tree.removed == 3
    with pytest.raises(AttestationRefused, match="raced with another writer 3 times"):
        TsmProvider("tdx", FakeTree(pki, race=5), TSM).evidence(
            "", report_data(PUBLIC_KEY, NONCE), NONCE)


def test_wrong_tsm_provider_and_missing_configfs_are_clear(pki: TestPki) -> None:
    with pytest.raises(AttestationRefused, match="offers 'sev_guest' evidence, not 'tdx_guest'"):
        TsmProvider("tdx", FakeTree(pki, provider="sev_guest"), TSM).evidence(
            "", report_data(PUBLIC_KEY, NONCE), NONCE)
    with pytest.raises(ConfigError, match="not a confidential VM"):
        TsmProvider("tdx", FakeTree(pki, provider=""), TSM)


def certificate_table(certs: dict[str, bytes]) -> bytes:
    guids = {"vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
             "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
             "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae"}
    offset = 24 * (len(certs) + 1)
    table, blobs = b"", b""
    for name, der in certs.items():
        table += struct.pack("<16sII", uuid.UUID(guids[name]).bytes_le, offset + len(blobs),
                             len(der))
        blobs += der
    return table + bytes(24) + blobs


@needs_fixtures
def test_snp_through_configfs_tsm_carries_the_certificate_chain(pki: TestPki) -> None:
    certs = {"vcek": fixture("snp/kds_vcek.der"), "ask": fixture("snp/milan_ask.der"),
             "ark": fixture("snp/milan_ark.der")}
    assert snp_certificates(certificate_table(certs)) == certs
    tree = FakeTree(pki, provider="sev_guest", snp_out=fixture("snp/attestation.bin"),
                    auxblob=certificate_table(certs))
    provider = TsmProvider("snp", tree, TSM)
    evidence = provider.evidence("", report_data(PUBLIC_KEY, NONCE), NONCE)
    assert provider.name == "snp"
    claims = SnpVerifier().verify(evidence)  # the genuine report: its chain verifies...
    assert not claims.binds(PUBLIC_KEY, NONCE)  # ...but it binds another key: the broker refuses
    assert set(json.loads(evidence)) == {"report", "vcek", "ask", "ark"}
    assert base64.b64decode(json.loads(evidence)["report"]) == fixture("snp/attestation.bin")
    assert FIXTURES.is_dir()


def test_gramine_quote_is_bound_and_its_attestation_type_checked(
        pki: TestPki, verifier: DcapVerifier) -> None:
    tree = FakeTree(pki, provider="", gramine_type="dcap")
    evidence = GramineProvider(tree, GRAMINE).evidence("", report_data(PUBLIC_KEY, NONCE), NONCE)
    assert verifier.verify(evidence).binds(PUBLIC_KEY, NONCE)
    with pytest.raises(ConfigError, match='remote_attestation = "dcap"'):
        GramineProvider(FakeTree(pki, provider="", gramine_type="epid"), GRAMINE)
    with pytest.raises(ConfigError, match="inside a Gramine SGX enclave"):
        GramineProvider(FakeTree(pki, provider=""), GRAMINE)


def test_auto_picks_what_the_machine_has(pki: TestPki) -> None:
    assert isinstance(auto_provider(FakeTree(pki, provider="", gramine_type="dcap")),
                      GramineProvider)
    chosen = auto_provider(FakeTree(pki, provider="sev_guest"))
    assert isinstance(chosen, TsmProvider) and chosen.kind == "snp"
    with pytest.raises(ConfigError, match="found no TEE"):
        auto_provider(FakeTree(pki, provider=""))
