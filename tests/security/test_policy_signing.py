"""Policy changes are signed: the broker takes a policy only with k of n operators' valid
Ed25519 signatures of its exact bytes; an unsigned or badly signed edit is refused, reported,
and the old policy keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ppml_serve.cli.main import main
from ppml_serve.crypto.attestation.policy import PolicyFile
from ppml_serve.crypto.attestation.policy_signing import (
    PolicyUnsigned,
    generate_signer,
    sign_policy,
    signature_path,
)

RELEASE = {"measurement": "aa" * 32, "model": "demo", "model_sha256": "1" * 64}


def write_policy(path: Path, measurement: str) -> None:
    path.write_text(yaml.safe_dump({"releases": [{**RELEASE, "measurement": measurement}]}))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))


@pytest.fixture()
def operators(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    found = {}
    for name in ("alice", "bob", "carol"):
        key = tmp_path / f"{name}.pem"
        found[name] = (key, generate_signer(key))
    return found


def test_k_of_n_signatures_or_the_old_policy_stays(
        tmp_path: Path, operators: dict[str, tuple[Path, str]]) -> None:
    signers = {name: public for name, (_, public) in operators.items()}
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "aa" * 32)
    with pytest.raises(PolicyUnsigned, match="0 valid operator signature"):
        PolicyFile(policy, signers=signers, threshold=2)
    sign_policy(policy, operators["alice"][0], "alice")
    with pytest.raises(PolicyUnsigned, match=r"1 valid operator signature.*2 required.*alice"):
        PolicyFile(policy, signers=signers, threshold=2)
    sign_policy(policy, operators["bob"][0], "bob")
    problems: list[str] = []
    accepted: list[list[str]] = []
    watched = PolicyFile(policy, problems.append, signers, 2,
                         lambda digest, names: accepted.append(names))
    assert watched.current().releases[0].measurement == "aa" * 32
    assert accepted == [["alice", "bob"]]

    # Someone who can write the file allows another measurement: refused, old one serves.
    write_policy(policy, "bb" * 32)
    assert watched.current().releases[0].measurement == "aa" * 32
    assert problems and "0 valid operator signature" in problems[-1]
    # A signature by a key the broker does not know does not count.
    stranger = tmp_path / "mallory.pem"
    generate_signer(stranger)
    sign_policy(policy, stranger, "alice")  # claims to be alice
    write_policy(policy, "bb" * 32)
    assert watched.current().releases[0].measurement == "aa" * 32
    # Two real operators sign the change: it takes effect.
    sign_policy(policy, operators["alice"][0], "alice")
    sign_policy(policy, operators["carol"][0], "carol")
    assert watched.current().releases[0].measurement == "bb" * 32
    assert accepted[-1] == ["alice", "carol"]


def test_a_signature_file_edited_by_hand_is_refused(
        tmp_path: Path, operators: dict[str, tuple[Path, str]]) -> None:
    signers = {name: public for name, (_, public) in operators.items()}
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "aa" * 32)
    sign_policy(policy, operators["alice"][0], "alice")
    signature_path(policy).write_text("{not json")
    with pytest.raises(PolicyUnsigned, match="damaged"):
        PolicyFile(policy, signers=signers, threshold=1)


def test_policy_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        return int(exited.value.code or 0)

    assert run("policy", "keygen", "alice", "--out", str(tmp_path / "alice.pem")) == 0
    public = capsys.readouterr().out.rsplit("alice: ", 1)[1].strip()
    assert oct((tmp_path / "alice.pem").stat().st_mode & 0o777) == "0o600"
    assert run("policy", "keygen", "alice", "--out", str(tmp_path / "alice.pem")) == 2
    capsys.readouterr()
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "aa" * 32)
    config = tmp_path / "ppml.yaml"
    config.write_text(yaml.safe_dump({"keybroker": {"policy_signers": {"alice": public}}}))
    verify = ("policy", "verify", "--config", str(config), "--state-dir", str(tmp_path / "s"),
              str(policy))
    assert run(*verify) == 1 and "REFUSED" in capsys.readouterr().err
    assert run("policy", "sign", str(policy), "--key", str(tmp_path / "alice.pem"),
               "--name", "alice") == 0
    assert run(*verify) == 0 and "signed by alice" in capsys.readouterr().out
