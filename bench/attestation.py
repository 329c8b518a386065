"""What attestation costs: verification of each evidence kind, and a whole key release.

    python bench/attestation.py --rounds 50 --out bench/results

- genuine SGX and TDX quotes (dcap-qvl, Intel's pinned root, at their collateral's time) and
  the genuine SEV-SNP report (its AMD chain), read from ../shared/fixtures/tee/;
- a test-PKI quote (the development default's evidence), verified against its root;
- a key release end to end in one process: nonce, test-PKI quote, verification, policy,
  per-model key derivation, sealing to the worker (the broker's KMS unwraps cached);
- the same over the key broker's HTTPS, as a worker does it (``obtain_keys``).

Prints and writes attestation.json: median and p90 milliseconds of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from ppml_serve.crypto.attestation.base import report_data
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.policy import Policy, Release
from ppml_serve.crypto.attestation.snp import SnpVerifier
from ppml_serve.crypto.attestation.test_pki import TestPki, TestPkiProvider
from ppml_serve.crypto.keystore import DataKeyTable
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.sealed_box import public_bytes
from ppml_serve.keybroker.service import InferenceKeys, KeyBroker, ReleaseRequest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tee"
MEASUREMENT = "ab" * 32


def timed(action: Callable[[], object], rounds: int) -> dict[str, float]:
    action()  # warm
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3),
            "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3), "rounds": rounds}


def genuine(rounds: int) -> dict[str, dict[str, float]]:
    if not FIXTURES.is_dir():
        print(f"skipping genuine evidence: {FIXTURES} not found", file=sys.stderr)
        return {}
    def read(name: str) -> bytes:
        return (FIXTURES / name).read_bytes()

    dcap = DcapVerifier()
    sgx = json.loads(read("sgx_quote_collateral.json"))
    tdx = json.loads(read("tdx_quote_collateral.json"))
    snp = SnpVerifier()
    chain = (read("snp/kds_vcek.der"), read("snp/milan_ask.der"), read("snp/milan_ark.der"))
    return {
        "sgx_quote_verify": timed(lambda: dcap.verify_quote(read("sgx_quote"), sgx,
                                                            1750334171), rounds),
        "tdx_quote_verify": timed(lambda: dcap.verify_quote(read("tdx_quote"), tdx,
                                                            1750331763), rounds),
        "snp_report_verify": timed(lambda: snp.verify_report(read("snp/attestation.bin"),
                                                             *chain), rounds),
    }


def release(rounds: int, directory: Path) -> dict[str, dict[str, float]]:
    pki = TestPki.generate()
    pki.save(directory)
    kms = LocalKMS.create(directory / "kms", SecretStr("bench"))
    table = DataKeyTable.create(directory / "kms" / "data-keys.json", kms)
    policy = Policy(allow_test_root=True, releases=[
        Release(measurement=MEASUREMENT, model="demo", model_sha256="0" * 64)])
    broker = KeyBroker(kms, table.unwrap_all(kms), table.active, policy,
                       {"dcap": DcapVerifier(test_root_der=pki.root_der)},
                       InferenceKeys(directory / "kms" / "inference.json", kms))
    provider = TestPkiProvider(directory)
    verifier = DcapVerifier(test_root_der=pki.root_der)
    quote_only = provider.evidence(MEASUREMENT, "00" * 32, None)

    def one_release() -> None:
        key = X25519PrivateKey.generate()
        nonce = broker.issue_nonce()
        evidence = provider.evidence(MEASUREMENT, report_data(public_bytes(key), nonce), nonce)
        broker.release(ReleaseRequest("dcap", evidence, public_bytes(key), "demo", nonce=nonce))

    return {"test_pki_quote_make": timed(lambda: provider.evidence(MEASUREMENT, "00" * 32, None),
                                         rounds),
            "test_pki_quote_verify": timed(lambda: verifier.verify(quote_only), rounds),
            "key_release_in_process": timed(one_release, rounds)}


def release_over_https(rounds: int, directory: Path) -> dict[str, dict[str, float]]:
    """A real key broker (uvicorn, TLS) from a prepared state directory."""
    import uvicorn

    from ppml_serve.crypto.attestation.test_pki import ROOT_FILE
    from ppml_serve.keybroker.client import obtain_keys
    from ppml_serve.keybroker.server import build_keybroker_server
    from ppml_serve.queue.redis_server import free_port
    from ppml_serve.settings import load_settings
    from ppml_serve.state import prepare_state

    settings = load_settings(state_dir=directory / "state")
    prepare_state(settings)
    settings.keybroker.port = free_port()
    settings.keybroker.dcap_test_root_file = settings.attestation_dir / ROOT_FILE
    settings.policy_file.write_text(json.dumps({
        "allowed_providers": ["dcap"], "allow_test_root": True,
        "releases": [{"measurement": MEASUREMENT, "model": "demo", "model_sha256": "0" * 64}]}))
    server: uvicorn.Server = build_keybroker_server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    provider = TestPkiProvider(settings.attestation_dir)
    url = f"https://127.0.0.1:{settings.keybroker.port}"
    try:
        return {"key_release_over_https": timed(
            lambda: obtain_keys(url, settings.ca_file, provider, MEASUREMENT, "demo", None),
            rounds)}
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {**genuine(args.rounds), **release(args.rounds, Path(scratch) / "a"),
                   **release_over_https(max(10, args.rounds // 5), Path(scratch) / "b")}
    for name, figures in results.items():
        print(f"{name:<26} median {figures['median_ms']:8.3f} ms   p90 {figures['p90_ms']:8.3f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attestation.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
