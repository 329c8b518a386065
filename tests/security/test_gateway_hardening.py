"""Hostile clients against a real HTTPS gateway (with a TLS Redis and a worker behind it):
slow and oversized heads, slow bodies, too many rows, malformed bodies, the metrics side
door, key handling. Each case was a finding against the service before it was fixed."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ppml_serve.gateway.auth import add_api_key, revoke_api_key
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_samples
from ppml_serve.state import read_api_key

from ..conftest import gateway_rss_mb, running_stack, stack_settings

IMAGES, _ = demo_samples()
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_ROWS = 64
RSS_BOUND_MB = 64
"""Growth of the gateway's memory allowed while 20 clients send endless headers."""


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("hardened"),
        gateway={"port": 0, "header_timeout_s": HEADER_TIMEOUT_S,
                 "body_timeout_s": BODY_TIMEOUT_S, "max_header_bytes": 16 * 1024},
        worker={"max_rows_per_request": MAX_ROWS, "heartbeat_s": 0.3, "claim_idle_ms": 1500,
                "engine_threads": 1})
    with running_stack(settings) as local:
        yield local


def _key(stack: LocalStack) -> str:
    return read_api_key(stack.settings.state_dir)


def _http(stack: LocalStack, token: str | None = None, scheme: str = "Bearer") -> httpx.Client:
    headers = {"Authorization": f"{scheme} {token or _key(stack)}"}
    return httpx.Client(base_url=stack.url, verify=str(stack.settings.ca_file), headers=headers,
                        timeout=30)


def _tls(stack: LocalStack) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(stack.settings.ca_file))
    raw = socket.create_connection((stack.settings.gateway.host, stack.settings.gateway.port))
    return context.wrap_socket(raw, server_hostname="localhost")


def _read_until_closed(sock: ssl.SSLSocket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return received, time.monotonic() - started


def test_slow_header_is_cut_off_within_the_timeout(hardened: LocalStack) -> None:
    sock = _tls(hardened)
    sock.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    sock.settimeout(0.2)
    closed_after = None
    for _ in range(40):  # a byte every 0.2 s would keep a naive server waiting forever
        try:
            sock.sendall(b"X")
            if sock.recv(4096) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            continue
        except (ssl.SSLError, ConnectionError, OSError):
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None and closed_after < HEADER_TIMEOUT_S + 1.0, closed_after


def test_slow_body_is_cut_off_with_408(hardened: LocalStack) -> None:
    sock = _tls(hardened)
    sock.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + _key(hardened).encode() +
                 b"\r\nContent-Length: 100000\r\n\r\n{\"inputs\"")
    received, elapsed = _read_until_closed(sock, BODY_TIMEOUT_S + 5)
    sock.close()
    assert received.startswith(b"HTTP/1.1 408"), received[:80]
    assert elapsed < BODY_TIMEOUT_S + 1.5, elapsed


def test_endless_headers_get_431_and_memory_stays_bounded(hardened: LocalStack) -> None:
    before = gateway_rss_mb(hardened)
    sockets = [_tls(hardened) for _ in range(20)]
    line = b"X-Junk: " + b"a" * 8000 + b"\r\n"
    answers = []
    for sock in sockets:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(2500):  # 20 MiB each, never terminated
                sock.sendall(line)
        except (ssl.SSLError, ConnectionError, OSError):
            pass
    peak = gateway_rss_mb(hardened)
    for sock in sockets:
        received, _ = _read_until_closed(sock, 5)
        answers.append(received[:12])
        sock.close()
    # the last sockets may meet the 1 s head deadline before the loop reaches them: 408
    assert all(answer in (b"HTTP/1.1 431", b"HTTP/1.1 408", b"") for answer in answers), answers
    assert answers.count(b"HTTP/1.1 431") >= 10, answers
    assert peak - before < RSS_BOUND_MB, f"RSS {before:.0f} -> {peak:.0f} MB"


def test_too_many_rows_is_413_naming_the_limit(hardened: LocalStack) -> None:
    rows = np.zeros((MAX_ROWS + 1, 8, 8), np.uint8)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(rows.shape),
                        "data": rows.ravel().tolist()}]}
    with _http(hardened) as http:
        response = http.post("/v2/models/demo/infer", json=body)
        body["inputs"][0]["shape"] = [MAX_ROWS, 8, 8]
        body["inputs"][0]["data"] = rows[:MAX_ROWS].ravel().tolist()
        fits = http.post("/v2/models/demo/infer", json=body)
    assert response.status_code == 413
    assert f"at most {MAX_ROWS} per request" in response.json()["error"]
    assert fits.status_code == 200


@pytest.mark.parametrize(("body", "path", "expected"), [
    (b"[" * 100_000 + b"]" * 100_000, "infer", "nested too deeply"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [0, 2**70, 8],
                             "data": []}]}).encode(), "infer", "shape dimensions"),
    (b"\x00garbage that no worker key opened", "infer-sealed", "could not be opened"),
    (b"", "infer-sealed", "could not be opened"),
])
def test_malformed_bodies_are_400_not_500(hardened: LocalStack, body: bytes, path: str,
                                          expected: str) -> None:
    with _http(hardened) as http:
        response = http.post(f"/v2/models/demo/{path}", content=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


def test_bearer_scheme_is_case_insensitive(hardened: LocalStack) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        with _http(hardened, scheme=scheme) as http:
            assert http.get("/v2/models/demo").status_code == 200, scheme
    with _http(hardened, scheme="Basic") as http:
        assert http.get("/v2/models/demo").status_code == 401


def test_metrics_need_a_metrics_key_and_labels_stay_bounded(hardened: LocalStack) -> None:
    infer_only = add_api_key(hardened.settings.api_keys_file, "infer-only", ["*"])
    time.sleep(1.1)  # the gateway re-reads the key file at most once a second
    with httpx.Client(base_url=hardened.url, verify=str(hardened.settings.ca_file)) as anon:
        assert anon.get("/metrics").status_code == 401
    with _http(hardened, infer_only) as http:
        assert http.get("/metrics").status_code == 403
        for index in range(50):
            http.post(f"/v2/models/{'x' * 500}{index}/infer", json={"inputs": []})
    with _http(hardened) as http:
        text = http.get("/metrics").text
    assert "x" * 500 not in text, "URL-chosen names became metric labels"
    assert 'ppml_requests_total{model="_other",status="404",version="_other"} 50.0' in text
    assert 'status="ok"' not in text


def test_revoked_key_is_refused_without_a_restart_and_jobs_belong_to_the_key(
        hardened: LocalStack) -> None:
    keys_file = hardened.settings.api_keys_file
    alice = add_api_key(keys_file, "alice", ["demo"])
    time.sleep(1.1)
    with _http(hardened, alice) as http:
        submitted = http.post("/v2/models/demo/jobs", json={"inputs": [{
            "name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
            "data": IMAGES[0].ravel().tolist()}]})
        assert submitted.status_code == 202
    job = submitted.json()["job_id"]
    revoke_api_key(keys_file, "alice")
    impostor = add_api_key(keys_file, "alice", ["demo"])  # the same name, another key
    time.sleep(1.1)
    with _http(hardened, alice) as http:
        assert http.get("/v2/models/demo").status_code == 401, "a revoked key still works"
    with _http(hardened, impostor) as http:
        assert http.get(f"/v2/models/demo/jobs/{job}").status_code == 404
        assert http.get("/v2/models/demo").status_code == 200
    # found: keys added or revoked from the CLI were audited only on its stderr; the
    # service's own (chained) audit log now records what each reload changed
    audit = hardened.settings.audit_log("gateway").read_text()
    assert "API key in force: name='alice'" in audit and "API key revoked: name='alice'" in audit


def test_key_names_are_unique_and_listed_without_secrets(hardened: LocalStack) -> None:
    state = str(hardened.settings.state_dir)
    command = [sys.executable, "-m", "ppml_serve", "keys"]
    first = subprocess.run([*command, "add-api-key", "--state-dir", state, "--name", "bob"],
                           capture_output=True, text=True, timeout=60)
    again = subprocess.run([*command, "add-api-key", "--state-dir", state, "--name", "bob"],
                           capture_output=True, text=True, timeout=60)
    listing = subprocess.run([*command, "list", "--state-dir", state], capture_output=True,
                             text=True, timeout=60)
    assert first.returncode == 0 and first.stdout.startswith("ppml_")
    assert again.returncode == 2 and "an API key named 'bob' exists" in again.stderr
    assert "bob" in listing.stdout and first.stdout.strip() not in listing.stdout
    assert "sha256" not in listing.stdout
    revoked = subprocess.run([*command, "revoke", "bob", "--state-dir", state],
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0 and "revoked API key 'bob'" in revoked.stdout
