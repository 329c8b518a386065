"""``attest verify`` (judge a piece of TEE evidence as the key broker would) and ``audit
verify`` (check an audit log's hash chain), for operators and security reviewers."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.policy import Policy
from ppml_serve.crypto.attestation.snp import REPORT_BYTES, SnpVerifier
from ppml_serve.errors import ConfigError

SNP_CHAIN_HELP = ("an SEV-SNP report needs --collateral VCEK.der and --ask/--ark (AMD KDS's "
                  "cert_chain); the ARK is checked against the pinned Milan/Genoa/Turin roots")


def _when(text: str | None) -> float:
    if text is None:
        return time.time()
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at: {text!r} is not an ISO-8601 time "
                          "(e.g. 2025-06-19T11:56:11Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


def _judge(evidence: bytes, collateral: bytes | None, ask: bytes | None, ark: bytes | None,
           at: float, test_root: bytes | None) -> Claims:
    if len(evidence) == REPORT_BYTES and evidence[:4] in (b"\x02\0\0\0", b"\x03\0\0\0",
                                                          b"\x05\0\0\0"):
        if collateral is None or ask is None or ark is None:
            raise ConfigError(SNP_CHAIN_HELP)
        return SnpVerifier().verify_report(evidence, collateral, ask, ark, at)
    if collateral is None:
        raise ConfigError("a DCAP quote needs --collateral (the collateral JSON: PCK CRL, TCB "
                          "info, QE identity, as 'attest collateral fetch' stores it)")
    try:
        document: dict[str, Any] = json.loads(collateral)
    except ValueError:
        raise ConfigError("--collateral is not DCAP collateral JSON") from None
    return DcapVerifier(test_root_der=test_root).verify_quote(evidence, document, at)


def attest_verify(evidence_path: Path, collateral_path: Path | None, ask_path: Path | None,
                  ark_path: Path | None, at_text: str | None, as_json: bool,
                  policy_path: Path | None, test_root_path: Path | None) -> int:
    """Exit 0 when the evidence verifies and the policy (default: the production one) takes
    it; 1 with the reason otherwise."""
    at = _when(at_text)
    evidence = _read(evidence_path, "evidence") or b""
    policy = Policy.load(policy_path) if policy_path is not None else Policy()
    report: dict[str, Any] = {"file": str(evidence_path),
                              "verified_at": dt.datetime.fromtimestamp(
                                  at, dt.timezone.utc).isoformat()}
    try:
        claims = _judge(evidence, _read(collateral_path, "--collateral"),
                        _read(ask_path, "--ask"), _read(ark_path, "--ark"), at,
                        _read(test_root_path, "--test-root"))
    except AttestationRefused as exc:
        report.update(verified=False, accepted=False, reason=str(exc))
        return _print(report, as_json)
    report.update(verified=True, tee=claims.tee, measurement=claims.measurement,
                  measurements=dict(claims.measurements), report_data=claims.report_data,
                  tcb_status=claims.tcb_status, advisories=list(claims.advisories),
                  debug=claims.debug, hardware_protected=claims.hardware_protected)
    try:
        policy.check_evidence(claims, at)
        report.update(accepted=True)
    except AttestationRefused as exc:
        report.update(accepted=False, reason=f"the policy refuses it: {exc}")
    return _print(report, as_json)


def _print(report: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        lines = [f"evidence:     {report['file']} (judged at {report['verified_at']})"]
        if report["verified"]:
            lines.append(f"TEE:          {str(report['tee']).upper()}"
                         f"{'' if report['hardware_protected'] else ' (TEST ROOT)'}")
            for name, value in report["measurements"].items():
                lines.append(f"{name + ':':<13} {value}")
            lines.append(f"report_data:  {report['report_data']}")
            lines.append(f"TCB status:   {report['tcb_status']}")
            lines.append(f"advisories:   {', '.join(report['advisories']) or 'none'}")
        lines.append("accepted by the policy" if report["accepted"]
                     else f"REFUSED: {report['reason']}")
        print("\n".join(lines))
    return 0 if report["accepted"] else 1


def audit_verify(path: Path) -> int:
    from ppml_serve.audit_chain import verify

    try:
        verdict = verify(path)
    except OSError as exc:
        raise ConfigError(f"audit verify: cannot read {path} ({exc.strerror})") from None
    if verdict.problem is None:
        print(f"{path}: {verdict.entries} entries, hash chain intact")
        return 0
    print(f"{path}: TAMPERED after {verdict.entries} good entries: {verdict.problem}",
          file=sys.stderr)
    return 1


def policy_keygen(out: Path, name: str) -> int:
    from ppml_serve.crypto.attestation.policy_signing import generate_signer

    if out.exists():
        raise ConfigError(f"{out} exists; choose another --out (a signing key is never "
                          "overwritten)")
    public = generate_signer(out)
    print(f"signing key written to {out} (keep it off the broker's machine)\n"
          f"add to the key broker's settings:\n  keybroker:\n    policy_signers:\n"
          f"      {name}: {public}")
    return 0


def policy_sign(policy: Path, key: Path, name: str) -> int:
    from ppml_serve.crypto.attestation.policy_signing import sign_policy, signature_path

    digest = sign_policy(policy, key, name)
    print(f"{name} signed {policy} (sha256 {digest}) into {signature_path(policy)}")
    return 0


def policy_verify(policy: Path, signers: dict[str, str], threshold: int) -> int:
    from ppml_serve.crypto.attestation.policy_signing import PolicyUnsigned, check_signatures
    from ppml_serve.private_files import read_protected

    if not signers:
        raise ConfigError("keybroker.policy_signers is empty: name the operators' keys in "
                          "the settings (--config) first")
    data = read_protected(policy, secret=False)
    try:
        names = check_signatures(data, policy, signers, threshold)
    except PolicyUnsigned as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return 1
    Policy.parse(data, policy)
    print(f"{policy}: signed by {', '.join(names)} ({len(names)} of {threshold} required); "
          "the key broker will take it")
    return 0


def collateral_fetch(store_dir: Path, evidence: list[Path], pccs: str | None, kds: str | None,
                     product: str) -> int:
    """Cache what each piece of evidence needs (a DCAP quote: from the PCCS; an SEV-SNP
    report: its VCEK and chain from AMD's KDS)."""
    from ppml_serve.crypto.attestation.collateral import CollateralStore
    from ppml_serve.crypto.attestation.collateral_fetch import fetch_dcap, fetch_snp

    store = CollateralStore(store_dir)
    for path in evidence:
        data = _read(path, "evidence") or b""
        if len(data) == REPORT_BYTES:
            if kds is None:
                raise ConfigError(f"{path} is an SEV-SNP report: give --kds URL "
                                  "(https://kdsintf.amd.com)")
            cached_at = fetch_snp(store, kds, data, product)
            print(f"{path}: VCEK and {product} chain cached in {cached_at}")
            continue
        if pccs is None:
            raise ConfigError(f"{path} is a DCAP quote: give --pccs URL (a PCCS, or Intel's "
                              "https://api.trustedservices.intel.com)")
        cached, next_update = fetch_dcap(store, pccs, data)
        print(f"{path}: collateral cached in {cached} (next update {next_update}; fetch "
              "again before then)")
    return 0


def hardware_entry(evidence_path: Path, collateral_path: Path | None, ask_path: Path | None,
                   ark_path: Path | None, at_text: str | None) -> dict[str, object]:
    """The typed release fields of a verified piece of TEE evidence (``attest measure``)."""
    try:
        claims = _judge(_read(evidence_path, "--evidence") or b"",
                        _read(collateral_path, "--collateral"), _read(ask_path, "--ask"),
                        _read(ark_path, "--ark"), _when(at_text), None)
    except AttestationRefused as exc:
        raise ConfigError(f"--evidence does not verify: {exc}") from None
    values = claims.measurements
    entry: dict[str, object] = {"tee": claims.tee, "measurement": claims.measurement}
    if claims.tee == "sgx":
        entry.update(mrsigner=values["mrsigner"], isv_prod_id=int(values["isv_prod_id"]),
                     min_isv_svn=int(values["isv_svn"]))
    elif claims.tee == "tdx":
        entry["rtmr"] = [values[f"rtmr{index}"] for index in range(4)]
    else:
        entry["host_data"] = values["host_data"]
        entry["min_tcb"] = {name: int(values[f"tcb_{name}"])
                            for name in ("bootloader", "tee", "snp", "microcode")}
    return entry
