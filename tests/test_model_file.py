"""Encrypted model files: round trip, tampering and wrong keys refused naming the file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from ppml_serve.crypto.kms.local import LocalKMS
from ppml_serve.crypto.model_file import (
    MAGIC,
    decrypt_model,
    encrypt_model,
    model_digest,
    read_header,
)
from ppml_serve.errors import IntegrityError
from ppml_serve.models import demo_model_path

PASSPHRASE = SecretStr("model-owner passphrase")


@pytest.fixture
def kms(tmp_path: Path) -> LocalKMS:
    return LocalKMS.create(tmp_path / "kms", PASSPHRASE)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(10_000))
    return path


def test_round_trip_in_chunks(tmp_path: Path, kms: LocalKMS, model: Path) -> None:
    target = tmp_path / "model.enc"
    seen: list[int] = []
    header = encrypt_model(model, target, kms, chunk_size=1024, progress=seen.append)
    assert sum(seen) == 10_000 and len(seen) == 10
    data = target.read_bytes()
    assert data.startswith(MAGIC) and model.read_bytes()[:64] not in data
    assert decrypt_model(target, kms=kms) == model.read_bytes()
    assert model_digest(target) == model_digest(model) == header.sha256
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("where", ["header", "first-chunk", "last-byte"])
def test_tampering_is_refused_naming_the_file(tmp_path: Path, kms: LocalKMS, model: Path,
                                              where: str) -> None:
    target = tmp_path / "model.enc"
    encrypt_model(model, target, kms, chunk_size=1024)
    data = bytearray(target.read_bytes())
    with target.open("rb") as handle:
        read_header(handle, "x")
        body_start = handle.tell()
    position = {"header": body_start - 5, "first-chunk": body_start + 3,
                "last-byte": len(data) - 1}[where]
    data[position] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=str(target)):
        decrypt_model(target, kms=kms)


def test_truncated_reordered_and_foreign_key(tmp_path: Path, kms: LocalKMS, model: Path) -> None:
    target = tmp_path / "model.enc"
    encrypt_model(model, target, kms, chunk_size=1024)
    data = target.read_bytes()
    (tmp_path / "short.enc").write_bytes(data[:-1040])
    with pytest.raises(IntegrityError, match=r"short\.enc"):
        decrypt_model(tmp_path / "short.enc", kms=kms)
    with target.open("rb") as handle:
        read_header(handle, "x")
        start = handle.tell()
    chunk = 1024 + 16
    swapped = data[:start] + data[start + chunk:start + 2 * chunk] + data[start:start + chunk] \
        + data[start + 2 * chunk:]
    (tmp_path / "swapped.enc").write_bytes(swapped)
    with pytest.raises(IntegrityError, match=r"swapped\.enc"):
        decrypt_model(tmp_path / "swapped.enc", kms=kms)
    with pytest.raises(IntegrityError, match=r"model\.enc: wrong key"):
        decrypt_model(target, file_key=os.urandom(32))
    other = LocalKMS.create(tmp_path / "other", PASSPHRASE)
    with pytest.raises(IntegrityError):
        decrypt_model(target, kms=other)


def test_not_an_encrypted_model(model: Path) -> None:
    with pytest.raises(IntegrityError, match="not an encrypted ppml-serve model"):
        decrypt_model(model, file_key=os.urandom(32))


def test_cli_encrypt_inspect_decrypt(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = dict(os.environ, PPML_KMS_PASSPHRASE="cli passphrase")
    run = [sys.executable, "-m", "ppml_serve"]
    subprocess.run([*run, "init", "--state-dir", str(state)], check=True, env=env,
                   capture_output=True)
    encrypted, restored = tmp_path / "demo.enc", tmp_path / "demo.onnx"
    done = subprocess.run([*run, "model", "encrypt", str(demo_model_path()), str(encrypted),
                           "--state-dir", str(state)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = json.loads(subprocess.run([*run, "model", "inspect", str(encrypted)], env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert shown["plaintext_sha256"] == model_digest(demo_model_path())
    assert "kms_key" not in shown
    again = subprocess.run([*run, "model", "encrypt", str(demo_model_path()), str(encrypted),
                            "--state-dir", str(state)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exists (use --force" in again.stderr
    subprocess.run([*run, "model", "decrypt", str(encrypted), str(restored), "--state-dir",
                    str(state)], env=env, check=True, capture_output=True)
    assert restored.read_bytes() == demo_model_path().read_bytes()
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600, "a plaintext model readable by others"
    wrong = subprocess.run([*run, "model", "decrypt", str(encrypted), str(tmp_path / "x"),
                            "--state-dir", str(state)], capture_output=True, text=True,
                           env=dict(env, PPML_KMS_PASSPHRASE="wrong"))
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.parametrize("argv", [
    ["worker", "--model", "demo=/no/such/model.onnx"],
    ["attest", "measure", "--model", "demo=/no/such/model.onnx"],
    ["model", "inspect", "/no/such/model.enc"],
])
def test_missing_model_file_is_a_clear_error(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ppml_serve", *argv, *(
        ["--state-dir", str(tmp_path)] if argv[0] != "model" else [])],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "no such" in done.stderr and "/no/such/model" in done.stderr
    assert "Traceback" not in done.stderr
