"""The managed Redis speaks only forward-secret AEAD suites, and a worker checks that the
queue is reachable and genuine before it asks the key broker for anything."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from ppml_serve.errors import NotReady
from ppml_serve.models import demo_model_path
from ppml_serve.private_files import write_private
from ppml_serve.settings import load_settings
from ppml_serve.state import prepare_state
from ppml_serve.worker import runner

from ..conftest import Stack


def _handshake(stack: Stack, ciphers: str, port: int | None = None) -> str:
    context = ssl.create_default_context(cafile=str(stack.ca_file))
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    port = port or stack.local.redis.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return str(tls.cipher()[0])


def test_redis_refuses_cbc_and_sha1_suites_on_tls_1_2(stack: Stack) -> None:
    for legacy in ("AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384",
                   "AES256-GCM-SHA384"):  # the last: GCM, but no forward secrecy
        with pytest.raises(ssl.SSLError):
            _handshake(stack, legacy)
    assert "GCM" in _handshake(stack, "ECDHE+AESGCM")


@pytest.mark.parametrize("which", ["https", "grpc", "keybroker"])
def test_gateway_ports_refuse_cbc_and_sha1_suites_on_tls_1_2(stack: Stack, which: str) -> None:
    """Found from outside: the HTTPS port (and the key broker's) also accepted CBC suites."""
    port = {"https": lambda: int(stack.url.rsplit(":", 1)[1]),
            "grpc": lambda: int(stack.local.grpc_address.rsplit(":", 1)[1]),
            "keybroker": lambda: stack.settings.keybroker.port}[which]()
    for legacy in ("AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384",
                   "AES256-GCM-SHA384"):
        with pytest.raises(ssl.SSLError):
            _handshake(stack, legacy, port)
    assert "GCM" in _handshake(stack, "ECDHE+AESGCM", port)


def test_worker_checks_the_queue_before_asking_for_keys(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    prepare_state(settings)
    with socket.socket() as probe:  # a port where no Redis listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_private(settings.redis_url_file, f"rediss://ppml:x@127.0.0.1:{port}/0\n".encode())
    asked: list[str] = []
    monkeypatch.setattr(runner, "UNAVAILABLE_PATIENCE_S", 0.5)
    monkeypatch.setattr(runner, "obtain_keys", lambda *args, **kwargs: asked.append("keys"))
    with pytest.raises(NotReady, match="redis not reachable"):
        runner.build_worker(settings, "demo", demo_model_path())
    assert asked == [], "keys were requested before the queue was verified"
