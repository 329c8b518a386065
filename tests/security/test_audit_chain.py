"""The audit log is tamper-evident (an edited, inserted, removed or cut-off line is found by
``audit verify``), and a caller cannot forge a line through a field it chooses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from ppml_serve.audit_chain import AuditChain, AuditHandler, verify
from ppml_serve.cli.main import main
from ppml_serve.crypto.attestation.base import AttestationRefused
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.policy import Policy
from ppml_serve.crypto.attestation.test_pki import TestPki
from ppml_serve.crypto.keystore import DataKeyTable
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.sealed_box import public_bytes
from ppml_serve.keybroker.service import InferenceKeys, KeyBroker, ReleaseRequest
from ppml_serve.logs import TextFormatter


def written(tmp_path: Path, count: int = 5) -> Path:
    chain = AuditChain(tmp_path / "audit.jsonl", "keybroker")
    for index in range(count):
        chain.append(f"event {index}", model="demo", decision="released")
    chain.close()
    return tmp_path / "audit.jsonl"


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_an_intact_chain_verifies_and_reopening_continues_it(tmp_path: Path) -> None:
    path = written(tmp_path)
    chain = AuditChain(path, "keybroker")  # a restarted broker carries on from the last line
    chain.append("after restart")
    chain.close()
    verdict = verify(path)
    assert (verdict.entries, verdict.problem) == (6, None)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_edited_line_is_found(tmp_path: Path) -> None:
    path = written(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["decision"] = "refused"
    lines[2] = json.dumps(entry)
    rewrite(path, lines)
    assert verify(path).problem == "line 3 was edited (its hash does not match)"


def test_inserted_removed_and_cut_off_lines_are_found(tmp_path: Path) -> None:
    path = written(tmp_path)
    lines = path.read_text().splitlines()
    rewrite(path, [*lines[:2], lines[1], *lines[2:]])
    assert "sequence 1 where 2 was due" in str(verify(path).problem)
    rewrite(path, lines[:2] + lines[3:])
    assert "sequence 3 where 2 was due" in str(verify(path).problem)
    rewrite(path, lines[1:])
    assert "line 1" in str(verify(path).problem)
    rewrite(path, lines[:-2])  # the tail cut off: only the head file knows
    assert "cut off the end" in str(verify(path).problem)
    rewrite(path, ['{"seq": 0, "event": "key release released"}'])
    assert verify(path).problem is not None


def test_audit_verify_command_exit_status(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path)
    with pytest.raises(SystemExit) as good:
        main(["audit", "verify", str(path)])
    assert good.value.code == 0 and "5 entries, hash chain intact" in capsys.readouterr().out
    lines = path.read_text().splitlines()
    rewrite(path, lines[:1] + lines[2:])
    with pytest.raises(SystemExit) as bad:
        main(["audit", "verify", str(path)])
    assert bad.value.code == 1 and "TAMPERED" in capsys.readouterr().err


def test_a_provider_with_crlf_forges_no_line(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The finding: a ``provider`` of "x\\r\\n... key release released ..." wrote a
    well-formed fake line. Now the text line stays one line and the chain holds an escaped
    field."""
    kms = LocalKMS.create(tmp_path / "kms", SecretStr("pass"))
    table = DataKeyTable.create(tmp_path / "kms" / "data-keys.json", kms)
    pki = TestPki.generate()
    broker = KeyBroker(kms, table.unwrap_all(kms), table.active, Policy(allow_test_root=True),
                       {"dcap": DcapVerifier(test_root_der=pki.root_der)},
                       InferenceKeys(tmp_path / "kms" / "inference.json", kms))
    chain = AuditChain(tmp_path / "audit.jsonl", "keybroker")
    handler = AuditHandler(chain)
    audit = logging.getLogger("ppml_serve.audit")
    audit.addHandler(handler)
    forged = ("dcap\r\n2026-01-01 00:00:00,000 INFO ppml_serve.audit: key release released: "
              "model='demo' measurement=aa provider=dcap peer=-")
    caplog.set_level(logging.INFO, "ppml_serve.audit")
    try:
        with pytest.raises(AttestationRefused):
            broker.release(ReleaseRequest(forged, "{}", public_bytes(X25519PrivateKey.generate()),
                                          "demo", peer="10.0.0.9\nINFO forged"))
    finally:
        audit.removeHandler(handler)
        chain.close()
    (record,) = [r for r in caplog.records if r.name == "ppml_serve.audit"]
    text = TextFormatter().format(record)
    assert "\n" not in text and "\r" not in text
    assert "key release refused" in text
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["provider"] == forged and entry["decision"] == "refused"
    assert entry["evidence_sha256"] and verify(tmp_path / "audit.jsonl").problem is None
