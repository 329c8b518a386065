"""``attest collateral fetch`` against a local HTTP server of this test: a DECLARED STAND-IN
for Intel's PCCS API and AMD's KDS (which cannot be reached here) that serves the genuine
fixture collateral in those services' formats. What it caches must then verify the genuine
quotes offline, and the broker's cache must answer for a quote that came without any."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ppml_serve.cli.main import main
from ppml_serve.crypto.attestation.collateral import CollateralStore
from ppml_serve.crypto.attestation.dcap import DcapVerifier, evidence_document
from ppml_serve.crypto.attestation.snp import SnpVerifier

from .test_tee_evidence import (
    SNP_MEASUREMENT,
    TDX_AT,
    collateral,
    fixture,
    needs_fixtures,
    snp_evidence,
)


class StandIn(BaseHTTPRequestHandler):
    """PCCS (/sgx|tdx/certification/v4/...) and KDS (/vcek/v1/...) over the fixtures."""

    served: ClassVar[dict[str, dict[str, Any]]] = {}
    hits: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, headers: dict[str, str] | None = None,
              status: int = 200) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, urllib.parse.quote(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        StandIn.hits.append(url.path)
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["vcek", "v1"]:
            if parts[3] == "cert_chain":
                chain = b"".join(x509.load_der_x509_certificate(fixture(f"snp/milan_{n}.der"))
                                 .public_bytes(serialization.Encoding.PEM)
                                 for n in ("ask", "ark"))
                return self._send(chain)
            return self._send(fixture("snp/kds_vcek.der"))
        tee, action = parts[0], "/".join(parts[3:])
        served = StandIn.served[tee]
        if action == "pckcrl":
            return self._send(bytes.fromhex(served["pck_crl"]),
                              {"SGX-PCK-CRL-Issuer-Chain": served["pck_crl_issuer_chain"]})
        if action == "rootcacrl":
            return self._send(served["root_ca_crl"].encode())
        if action == "tcb":
            body = (f'{{"tcbInfo":{served["tcb_info"]},'
                    f'"signature":"{served["tcb_info_signature"]}"}}')
            return self._send(body.encode(),
                              {"TCB-Info-Issuer-Chain": served["tcb_info_issuer_chain"]})
        if action == "qe/identity":
            body = (f'{{"enclaveIdentity":{served["qe_identity"]},'
                    f'"signature":"{served["qe_identity_signature"]}"}}')
            return self._send(body.encode(), {
                "SGX-Enclave-Identity-Issuer-Chain": served["qe_identity_issuer_chain"]})
        return self._send(b"not found", status=404)


@pytest.fixture()
def stand_in() -> Iterator[str]:
    StandIn.served = {"tdx": collateral("tdx_quote_collateral.json"),
                      "sgx": collateral("tdx_quote_collateral.json")}
    StandIn.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_fixtures
def test_fetched_dcap_collateral_verifies_the_quote_offline(stand_in: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    quote = tmp_path / "tdx_quote"
    quote.write_bytes(fixture("tdx_quote"))
    with pytest.raises(SystemExit) as exited:
        main(["attest", "collateral", "fetch", "--state-dir", str(tmp_path / "state"),
              "--pccs", stand_in, str(quote)])
    assert exited.value.code == 0, capsys.readouterr().err
    assert "next update 2025-07-19" in capsys.readouterr().out
    assert any(hit.endswith("/tcb") for hit in StandIn.hits)
    store = CollateralStore(tmp_path / "state" / "attestation" / "collateral")
    # The broker's verifier: the quote arrives alone; the cache supplies the rest.
    claims = DcapVerifier(store, clock=lambda: TDX_AT).verify(
        evidence_document(fixture("tdx_quote"), None))
    assert claims.tcb_status == "UpToDate" and claims.tee == "tdx"
    assert [name for name, _ in store.expiries()] == ["tdx-B0C06F000000.json"]


@needs_fixtures
def test_a_pccs_that_fails_is_a_clear_error(stand_in: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    quote = tmp_path / "q"
    quote.write_bytes(fixture("tdx_quote"))
    with pytest.raises(SystemExit) as exited:
        main(["attest", "collateral", "fetch", "--state-dir", str(tmp_path / "s"),
              "--pccs", stand_in + "/nowhere", str(quote)])
    assert exited.value.code == 2
    assert "collateral fetch from" in capsys.readouterr().err


@needs_fixtures
def test_fetched_vcek_lets_a_bare_snp_report_verify(stand_in: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.bin"
    report.write_bytes(fixture("snp/attestation.bin"))
    with pytest.raises(SystemExit) as exited:
        main(["attest", "collateral", "fetch", "--state-dir", str(tmp_path / "state"),
              "--kds", stand_in, str(report)])
    assert exited.value.code == 0, capsys.readouterr().err
    hit = next(h for h in StandIn.hits if h.startswith("/vcek/v1/Milan/") and
               "cert_chain" not in h)
    assert hit.endswith(fixture("snp/attestation.bin")[0x1A0:0x1E0].hex())
    store = CollateralStore(tmp_path / "state" / "attestation" / "collateral")
    bare = json.dumps({"report": json.loads(snp_evidence())["report"]})
    claims = SnpVerifier(store).verify(bare)
    assert claims.measurement == SNP_MEASUREMENT
    with pytest.raises(Exception, match="VCEK, ASK and ARK"):
        SnpVerifier(CollateralStore(tmp_path / "empty")).verify(bare)


@needs_fixtures
def test_collateral_expiry_is_a_metric_and_a_log_line(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import datetime as dt
    import logging

    from starlette.testclient import TestClient

    from ppml_serve.crypto.attestation.test_pki import FMSPC, TestPki
    from ppml_serve.keybroker.app import create_app, warn_of_expiry

    from .test_tee_evidence import Broker

    store = CollateralStore(tmp_path / "collateral")
    store.put("tdx", "B0C06F000000", collateral("tdx_quote_collateral.json"))  # long expired
    pki = TestPki.generate()
    soon = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=27)  # next update in 3 days
    store.put("sgx", FMSPC.hex(), pki.collateral(soon))
    caplog.set_level(logging.WARNING, "ppml_serve.keybroker")
    warn_of_expiry(store)
    lines = {r.levelname: r.getMessage() for r in caplog.records}
    assert "tdx-B0C06F000000.json expired" in lines["ERROR"]
    assert "expires in 2.9 days" in lines["WARNING"] or "expires in 3.0 days" in lines["WARNING"]
    app = create_app(Broker(tmp_path, pki).service, store)
    with TestClient(app) as client:
        text = client.get("/v1/metrics").text
    gauges = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ppml_attestation_collateral_expiry_seconds{")}
    assert gauges["tdx-B0C06F000000.json"] < 0 < gauges[f"sgx-{FMSPC.hex().upper()}.json"]
