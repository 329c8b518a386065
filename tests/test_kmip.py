"""The KMIP adapter against a real PyKMIP server started by the test (mutual TLS 1.2)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ppml_serve.crypto.kms.kmip import KmipKMS
from ppml_serve.crypto.model_file import decrypt_model, encrypt_model
from ppml_serve.crypto.tls import ensure_dev_pki, issue_client_cert
from ppml_serve.errors import IntegrityError, NotReady
from ppml_serve.models import demo_model_path
from ppml_serve.queue.redis_server import free_port


@dataclass
class KmipServer:
    port: int
    directory: Path

    def client(self, name: str, state: Path) -> KmipKMS:
        cert, key = issue_client_cert(self.directory, name)
        return KmipKMS("127.0.0.1", self.port, cert, key, self.directory / "ca.pem", state)


@pytest.fixture(scope="module")
def kmip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    directory = tmp_path_factory.mktemp("kmip")
    pki = ensure_dev_pki(directory)
    port = free_port()
    (directory / "policies").mkdir()
    (directory / "server.conf").write_text(
        "[server]\nhostname=127.0.0.1\n"
        f"port={port}\ncertificate_path={pki.cert_file}\nkey_path={pki.key_file}\n"
        f"ca_path={pki.ca_file}\nauth_suite=TLS1.2\npolicy_path={directory / 'policies'}\n"
        f"enable_tls_client_auth=True\nlogging_level=WARNING\n"
        f"database_path={directory / 'kmip.db'}\n")
    server_bin = Path(sys.executable).with_name("pykmip-server")
    process = subprocess.Popen(
        [str(server_bin) if server_bin.exists() else "pykmip-server", "-f",
         str(directory / "server.conf"), "-l", str(directory / "server.log")],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own group: the server forks, and all of it must stop
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield KmipServer(port, directory)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_data_keys_wrapped_by_the_server(kmip_server: KmipServer, tmp_path: Path) -> None:
    kms = kmip_server.client("ppml-kms-client", tmp_path)
    kms.create_primary_key()
    key = kms.generate_data_key()
    assert len(key.plaintext) == 32 and key.plaintext not in key.wrapped
    assert kms.unwrap(key.wrapped) == key.plaintext
    assert key.plaintext.hex() not in repr(kms) and key.plaintext.hex() not in repr(key)


def test_tampered_wrapped_key_refused(kmip_server: KmipServer, tmp_path: Path) -> None:
    kms = kmip_server.client("ppml-kms-client", tmp_path)
    kms.create_primary_key()
    wrapped = kms.generate_data_key().wrapped
    for position in (len(wrapped) - 1, len(wrapped) - 20, 8):
        tampered = bytearray(wrapped)
        tampered[position] ^= 0x01
        with pytest.raises(IntegrityError):
            kms.unwrap(bytes(tampered))


def test_rotation_keeps_old_keys_usable(kmip_server: KmipServer, tmp_path: Path) -> None:
    kms = kmip_server.client("ppml-kms-client", tmp_path)
    first = kms.create_primary_key()
    before = kms.generate_data_key()
    kms.rotate()
    after = kms.generate_data_key()
    assert after.primary_key_id != first
    reopened = kmip_server.client("ppml-kms-client", tmp_path)
    assert reopened.unwrap(before.wrapped) == before.plaintext
    assert reopened.unwrap(after.wrapped) == after.plaintext


def test_another_client_certificate_cannot_use_the_key(kmip_server: KmipServer,
                                                       tmp_path: Path) -> None:
    owner = kmip_server.client("ppml-kms-client", tmp_path / "a")
    owner.create_primary_key()
    wrapped = owner.generate_data_key().wrapped
    stranger = kmip_server.client("someone-else", tmp_path / "b")
    with pytest.raises(IntegrityError):
        stranger.unwrap(wrapped)


def test_encrypted_model_with_kmip_key(kmip_server: KmipServer, tmp_path: Path) -> None:
    kms = kmip_server.client("ppml-kms-client", tmp_path)
    kms.create_primary_key()
    encrypted = tmp_path / "demo.enc"
    encrypt_model(demo_model_path(), encrypted, kms)
    assert decrypt_model(encrypted, kms=kms) == demo_model_path().read_bytes()


def test_unreachable_server_is_a_clear_error(tmp_path: Path, kmip_server: KmipServer) -> None:
    cert, key = issue_client_cert(kmip_server.directory, "ppml-kms-client")
    kms = KmipKMS("127.0.0.1", free_port(), cert, key, kmip_server.directory / "ca.pem",
                  tmp_path)
    with pytest.raises(NotReady, match="KMIP server unreachable"):
        kms.create_primary_key()


def test_unreachable_kmip_is_unavailable_not_a_refusal(kmip_server: KmipServer,
                                                       tmp_path: Path) -> None:
    """A KMS outage must not look like a tampered key (the broker would answer 403 and the
    worker exit as refused); it is ``KMSUnavailable``, which callers retry."""
    from ppml_serve.errors import KMSUnavailable

    kms = kmip_server.client("ppml-outage-client", tmp_path)
    kms.create_primary_key()
    wrapped = kms.generate_data_key().wrapped
    cert, key = issue_client_cert(kmip_server.directory, "ppml-outage-client")
    down = KmipKMS("127.0.0.1", free_port(), cert, key, kmip_server.directory / "ca.pem",
                   tmp_path)
    with pytest.raises(KMSUnavailable):
        down.unwrap(wrapped)
    assert kms.unwrap(wrapped)  # the same key opens once the server is reachable
