"""Record envelopes and the local KMS: real AES-GCM, every tampering refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ppml_serve.crypto.envelope import REPLY, REQUEST, Keyring, PlaintextSealer, associated_data
from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.errors import ConfigError, IntegrityError

AAD = associated_data("demo", "req-1", REQUEST)


@pytest.fixture
def keyring() -> Keyring:
    return Keyring({"k1": os.urandom(32)}, "k1")


def test_round_trip_and_header(keyring: Keyring) -> None:
    sealed = keyring.seal(b"hello", AAD)
    assert sealed[:2] == b"PE" and sealed[2] == 1 and sealed[4:6] == b"k1"
    assert b"hello" not in sealed
    assert keyring.open(sealed, AAD) == b"hello"
    assert keyring.seal(b"hello", AAD) != sealed, "nonces must differ"


def test_every_flipped_byte_is_refused(keyring: Keyring) -> None:
    sealed = keyring.seal(b"x" * 40, AAD)
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x80
        with pytest.raises(IntegrityError):
            keyring.open(bytes(tampered), AAD)


@pytest.mark.parametrize("aad", [
    associated_data("demo", "req-2", REQUEST),   # replayed for another request
    associated_data("other", "req-1", REQUEST),  # another model
    associated_data("demo", "req-1", REPLY),     # a request passed off as a reply
])
def test_record_bound_to_model_request_and_direction(keyring: Keyring, aad: bytes) -> None:
    with pytest.raises(IntegrityError):
        keyring.open(keyring.seal(b"data", AAD), aad)


def test_truncated_and_foreign_records_refused(keyring: Keyring) -> None:
    sealed = keyring.seal(b"data", AAD)
    for record in (b"", b"PE", sealed[:10], sealed[:-1], b"XX" + sealed[2:]):
        with pytest.raises(IntegrityError):
            keyring.open(record, AAD)
    other = Keyring({"k1": os.urandom(32)}, "k1")
    with pytest.raises(IntegrityError):
        other.open(sealed, AAD)


def test_error_and_repr_never_show_key_material() -> None:
    key = os.urandom(32)
    keyring = Keyring({"k1": key}, "k1")
    assert key.hex() not in repr(keyring) and str(key) not in repr(keyring)
    with pytest.raises(IntegrityError) as caught:
        keyring.open(b"PE\x01\x02k1" + b"\x00" * 40, AAD)
    assert str(caught.value) == "record failed authentication"


def test_plaintext_sealer_is_labelled_insecure() -> None:
    assert "INSECURE" in repr(PlaintextSealer())


def test_local_kms_files_rotation_and_old_records(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms")
    for name in ("primary.key", "data-keys.json"):
        assert stat.S_IMODE((tmp_path / "kms" / name).stat().st_mode) == 0o600
    old = kms.keyring()
    sealed = old.seal(b"before rotation", AAD)
    new_id = kms.rotate()
    reopened = LocalKMS(tmp_path / "kms").keyring()
    assert reopened.active_key_id == new_id != old.active_key_id
    assert reopened.open(sealed, AAD) == b"before rotation"
    assert reopened.seal(b"x", AAD)[4:4 + len(new_id)] == new_id.encode()
    with pytest.raises(ConfigError):
        LocalKMS.create(tmp_path / "kms")


def test_local_kms_refuses_swapped_wrapped_keys(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms")
    kms.rotate()
    table = (tmp_path / "kms" / "data-keys.json").read_text()
    first, second = kms.key_ids
    import json

    document = json.loads(table)
    keys = document["keys"]
    keys[first]["wrapped"], keys[second]["wrapped"] = (keys[second]["wrapped"],
                                                       keys[first]["wrapped"])
    (tmp_path / "kms" / "data-keys.json").write_text(json.dumps(document))
    with pytest.raises(IntegrityError):
        LocalKMS(tmp_path / "kms").unwrap(first)


def test_missing_kms_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"keys init|ppml-serve up"):
        LocalKMS(tmp_path / "nothing")
