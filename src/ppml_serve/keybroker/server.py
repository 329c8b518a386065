"""Assemble the key broker process from settings."""

from __future__ import annotations

import logging

import uvicorn

from ppml_serve.audit_chain import attach
from ppml_serve.crypto.attestation.base import Verifier
from ppml_serve.crypto.attestation.collateral import CollateralStore
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.jwt_token import JwtVerifier
from ppml_serve.crypto.attestation.policy import PolicyFile
from ppml_serve.crypto.attestation.simulated import PUBLIC_FILE, SimulatedVerifier
from ppml_serve.crypto.attestation.snp import SnpVerifier
from ppml_serve.crypto.keys import data_key_table, open_kms
from ppml_serve.crypto.tls import SERVER_CIPHERS
from ppml_serve.errors import ConfigError
from ppml_serve.guarded_http import guarded_protocol
from ppml_serve.keybroker.app import create_app
from ppml_serve.keybroker.service import InferenceKeys, KeyBroker
from ppml_serve.private_files import read_protected
from ppml_serve.settings import Settings

audit = logging.getLogger("ppml_serve.audit")


def verifiers(settings: Settings) -> dict[str, Verifier]:
    broker = settings.keybroker
    test_root = read_protected(broker.dcap_test_root_file, secret=False) \
        if broker.dcap_test_root_file is not None else None
    if test_root is not None:
        audit.warning("DCAP quotes are verified against a TEST root (%s), not Intel's: no "
                      "hardware protection", broker.dcap_test_root_file)
    found: dict[str, Verifier] = {
        "dcap": DcapVerifier(CollateralStore(settings.collateral_dir), test_root),
        "snp": SnpVerifier(CollateralStore(settings.collateral_dir))}
    if (settings.attestation_dir / PUBLIC_FILE).exists():
        found["simulated"] = SimulatedVerifier.from_directory(settings.attestation_dir)
    if broker.jwks_file is not None and broker.jwt_issuer:
        found["jwt"] = JwtVerifier.from_file(broker.jwks_file, broker.jwt_issuer)
    return found


def build_broker(settings: Settings) -> KeyBroker:
    kms = open_kms(settings)
    table = data_key_table(settings)
    attach(settings.audit_log("keybroker"), "keybroker")
    broker = settings.keybroker
    if broker.policy_signers and broker.policy_threshold > len(broker.policy_signers):
        raise ConfigError(f"keybroker.policy_threshold: {broker.policy_threshold} signatures "
                          f"required but only {len(broker.policy_signers)} signers named")
    policy = PolicyFile(
        settings.policy_file,
        lambda problem: audit.error("policy change refused, the previous policy stays in "
                                    "force: %s", problem,
                                    extra={"audit": {"decision": "refused"}}),
        broker.policy_signers, broker.policy_threshold,
        lambda digest, signers: audit.info(
            "policy in force: sha256=%s signed by %s", digest, ", ".join(signers) or "nobody "
            "(no signers configured)",
            extra={"audit": {"policy_sha256": digest, "signed_by": signers}}))
    return KeyBroker(kms, table.unwrap_all(kms), table.active, policy,
                     verifiers(settings),
                     InferenceKeys(settings.keybroker.inference_keys_file
                                   or settings.kms_dir / "inference-keys.json", kms))


def build_keybroker_server(settings: Settings) -> uvicorn.Server:
    app = create_app(build_broker(settings), CollateralStore(settings.collateral_dir))
    config = uvicorn.Config(app, host=settings.keybroker.host, port=settings.keybroker.port,
                            loop="uvloop", log_level="warning",
                            # the same head-size and read-deadline limits as the gateway
                            http=guarded_protocol(16 * 1024, 10.0, 10.0),
                            limit_concurrency=256,
                            # TLS 1.2 with forward-secret AEAD suites only (or 1.3)
                            ssl_ciphers=SERVER_CIPHERS,
                            access_log=False, ssl_certfile=str(settings.server_cert_file),
                            ssl_keyfile=str(settings.server_key_file))
    return uvicorn.Server(config)
