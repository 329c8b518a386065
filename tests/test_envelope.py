"""Record envelopes and the local KMS: real AES-GCM, every tampering refused."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from ppml_serve.crypto.envelope import REPLY, REQUEST, Keyring, PlaintextSealer, associated_data
from ppml_serve.crypto.keystore import DataKeyTable
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


PASSPHRASE = SecretStr("correct horse battery staple")


def test_local_kms_file_is_passphrase_protected(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms", PASSPHRASE)
    path = tmp_path / "kms" / "primary-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["kdf"] == "scrypt" and document["scrypt"]["n"] >= 2**14
    key = kms.generate_data_key()
    assert LocalKMS(tmp_path / "kms", PASSPHRASE).unwrap(key.wrapped) == key.plaintext
    with pytest.raises(ConfigError, match="wrong passphrase"):
        LocalKMS(tmp_path / "kms", SecretStr("wrong"))
    with pytest.raises(ConfigError, match="already holds a KMS"):
        LocalKMS.create(tmp_path / "kms", PASSPHRASE)


def test_rotation_keeps_old_wrapped_keys_and_records_usable(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms", PASSPHRASE)
    table = DataKeyTable.create(tmp_path / "kms" / "data-keys.json", kms)
    old_key = kms.generate_data_key()
    sealed = table.keyring(kms).seal(b"before rotation", AAD)
    assert kms.rotate().endswith("v2")
    new_id = table.rotate(kms)
    reopened = LocalKMS(tmp_path / "kms", PASSPHRASE)
    keyring = DataKeyTable.load(tmp_path / "kms" / "data-keys.json").keyring(reopened)
    assert keyring.active_key_id == new_id
    assert keyring.open(sealed, AAD) == b"before rotation"
    assert reopened.unwrap(old_key.wrapped) == old_key.plaintext
    assert reopened.generate_data_key().wrapped != old_key.wrapped
    assert reopened.describe()[reopened.default_key_id] == {"versions": [1, 2], "current": 2}


def test_tampered_wrapped_key_refused(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms", PASSPHRASE)
    wrapped = bytearray(kms.generate_data_key().wrapped)
    for position in (0, 5, len(wrapped) - 1):
        tampered = bytearray(wrapped)
        tampered[position] ^= 1
        with pytest.raises(IntegrityError):
            kms.unwrap(bytes(tampered))


def test_kms_repr_and_errors_hold_no_secrets(tmp_path: Path) -> None:
    kms = LocalKMS.create(tmp_path / "kms", PASSPHRASE)
    key = kms.generate_data_key()
    assert key.plaintext.hex() not in repr(key) and "plaintext" not in repr(key)
    assert PASSPHRASE.get_secret_value() not in repr(kms)


def test_missing_kms_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ppml-serve init|ppml-serve up"):
        LocalKMS(tmp_path / "nothing", PASSPHRASE)
