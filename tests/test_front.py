"""The native front (Rust: rustls, hyper) before a real gateway, Redis and worker: what was
found from outside against the Python gateway alone, held on the front (issue 20)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ppml_serve.client import Client
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.state import read_api_key

from .conftest import gateway_rss_mb, running_stack, stack_settings

IMAGES, _ = demo_samples()
MAX_HEADER_BYTES = 16 * 1024
RSS_SLACK_MB = 100


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(tmp_path_factory.mktemp("front"),
                              gateway={"port": 0, "max_header_bytes": MAX_HEADER_BYTES,
                                       "keep_alive_s": 30},
                              worker={"engine_threads": 1})
    with running_stack(settings) as local:
        yield local


def _local(images: np.ndarray) -> np.ndarray:
    engine = load_engine("demo", demo_model_path().read_bytes())
    return engine.infer({"image": images})["probabilities"].argmax(axis=1)


def _tls(stack: LocalStack, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    context = context or ssl.create_default_context(cafile=str(stack.settings.ca_file))
    raw = socket.create_connection((stack.settings.gateway.host, stack.settings.gateway.port),
                                   timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _head_of(size: int) -> bytes:
    """A GET of the live probe whose head (request line, headers, blank line) is ``size``."""
    start = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def _answer(sock: ssl.SSLSocket) -> bytes:
    received = b""
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return received


def test_the_head_limit_is_exact(fronted: LocalStack) -> None:
    # found: 24 KiB heads passed where 16 KiB is documented
    for size, status in ((MAX_HEADER_BYTES, b"200"), (MAX_HEADER_BYTES + 1, b"431")):
        with _tls(fronted) as sock:
            sock.sendall(_head_of(size))
            assert _answer(sock).startswith(b"HTTP/1.1 " + status), size


def test_pipelined_bytes_do_not_count_against_the_next_head(fronted: LocalStack) -> None:
    # three heads of 12 KiB in one write: 36 KiB buffered, each head within the limit
    with _tls(fronted) as sock:
        sock.sendall(_head_of(12 * 1024) * 3)
        received = b""
        sock.settimeout(10)
        while received.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert b"431" not in received


def test_tls_refuses_cbc_suites_and_serves_aead(fronted: LocalStack) -> None:
    # found: the HTTPS port accepted TLS 1.2 CBC suites
    cbc = ssl.create_default_context(cafile=str(fronted.settings.ca_file))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:"
                    "ECDHE-RSA-AES256-SHA384:AES128-SHA:AES256-SHA")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls(fronted, cbc).close()
    aead = ssl.create_default_context(cafile=str(fronted.settings.ca_file))
    aead.maximum_version = ssl.TLSVersion.TLSv1_2
    aead.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    with _tls(fronted, aead) as sock:
        suite = sock.cipher()[0]
        assert sock.version() == "TLSv1.2" and ("GCM" in suite or "CHACHA" in suite), suite
    with _tls(fronted) as sock:
        assert sock.version() == "TLSv1.3"


def test_http2_infers_through_the_front(fronted: LocalStack) -> None:
    key = read_api_key(fronted.settings.state_dir)
    with httpx.Client(base_url=fronted.url, verify=str(fronted.settings.ca_file), http2=True,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8],
                            "data": IMAGES[:2].ravel().tolist()}]}
        answers = [http.post("/v2/models/demo/infer", json=body) for _ in range(3)]
    assert all(a.http_version == "HTTP/2" and a.status_code == 200 for a in answers), answers
    scores = np.array(answers[0].json()["outputs"][0]["data"]).reshape(2, -1)
    assert list(scores.argmax(axis=1)) == list(_local(IMAGES[:2]))


def test_a_declared_oversized_body_is_413_before_it_is_read(fronted: LocalStack) -> None:
    with _tls(fronted) as sock:
        sock.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1073741824\r\n\r\n")
        received = _answer(sock)
    assert received.startswith(b"HTTP/1.1 413"), received[:80]
    assert b"gateway.max_request_bytes" in received


def test_clients_that_pipeline_and_never_read_hold_bounded_memory(fronted: LocalStack) -> None:
    # found: 200 such clients, three rounds, grew the Python gateway 102 -> 407 MB for good
    key = read_api_key(fronted.settings.state_dir).encode()
    body = (b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,8,8],"data":['
            + b",".join(b"%d" % v for v in IMAGES[0].ravel()) + b"]}]}")
    request = (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key
               + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
               + body)
    with Client(fronted.url, api_key=key.decode(), ca_file=fronted.settings.ca_file) as client:
        client.infer("demo", IMAGES[:1])  # warm
    baseline = gateway_rss_mb(fronted)
    peak = baseline
    for _ in range(3):
        sockets = [_tls(fronted) for _ in range(100)]
        for sock in sockets:
            sock.setblocking(False)
            try:
                for _ in range(40):  # ~40 answers each, never read
                    sock.sendall(request)
            except (BlockingIOError, ssl.SSLWantWriteError):
                pass  # the front stopped reading: its buffers are full, as they should be
        time.sleep(1.0)
        peak = max(peak, gateway_rss_mb(fronted))
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and gateway_rss_mb(fronted) > baseline + RSS_SLACK_MB:
        time.sleep(0.5)
    settled = gateway_rss_mb(fronted)
    assert settled <= baseline + RSS_SLACK_MB, (baseline, peak, settled)
    with Client(fronted.url, api_key=key.decode(), ca_file=fronted.settings.ca_file) as client:
        outputs = client.infer("demo", IMAGES[:4])["probabilities"]
    assert list(outputs.argmax(axis=1)) == list(_local(IMAGES[:4]))


def test_a_60_mib_json_request_holds_bounded_memory(fronted: LocalStack) -> None:
    # found: one 60 MiB JSON request peaked the Python gateway at 680 MB (a Python object per
    # number); the v2 decoder (ppml-core) reads JSON data straight into typed buffers
    row = b",".join(b"%d" % v for v in IMAGES[0].ravel())
    rows = (60 << 20) // (len(row) + 1)
    body = (b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[%d,8,8],"data":[' % rows
            + b",".join([row] * rows) + b"]}]}")
    key = read_api_key(fronted.settings.state_dir)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    baseline = gateway_rss_mb(fronted)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak.append(gateway_rss_mb(fronted))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with httpx.Client(base_url=fronted.url, verify=str(fronted.settings.ca_file),
                          timeout=60) as http:
            response = http.post("/v2/models/demo/infer", content=body, headers=headers)
    finally:
        done.set()
        sampler.join()
    del body
    assert response.status_code == 413, response.text  # decoded whole, then over the row cap
    assert "per request" in response.json()["error"]
    # the 60 MiB body itself, as the app receives it, and twice 15 MiB of decoded items
    assert max(peak) - baseline < 150, (baseline, max(peak))  # measured +109 (old: +318)
    with Client(fronted.url, api_key=key, ca_file=fronted.settings.ca_file) as client:
        outputs = client.infer("demo", IMAGES[:4])["probabilities"]
    assert list(outputs.argmax(axis=1)) == list(_local(IMAGES[:4]))


def test_a_thousand_idle_keep_alive_connections_hold_bounded_memory(fronted: LocalStack) -> None:
    baseline = gateway_rss_mb(fronted)
    idle = []
    try:
        for _ in range(1000):
            sock = _tls(fronted)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(sock).startswith(b"HTTP/1.1 200")
            idle.append(sock)  # kept alive, idle
        held = gateway_rss_mb(fronted)
        key = read_api_key(fronted.settings.state_dir)
        with Client(fronted.url, api_key=key, ca_file=fronted.settings.ca_file) as client:
            outputs = client.infer("demo", IMAGES[:2])["probabilities"]
    finally:
        for sock in idle:
            sock.close()
    assert held <= baseline + RSS_SLACK_MB, (baseline, held)
    assert list(outputs.argmax(axis=1)) == list(_local(IMAGES[:2]))


def test_the_fronts_counters_are_in_the_gateways_metrics(fronted: LocalStack) -> None:
    with _tls(fronted) as sock:  # one refusal to count
        sock.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1073741824\r\n\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 413")
    key = read_api_key(fronted.settings.state_dir)
    text = httpx.get(f"{fronted.url}/metrics", headers={"Authorization": f"Bearer {key}"},
                     verify=str(fronted.settings.ca_file), timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("ppml_front_")}
    assert values["ppml_front_connections_total"] >= 2, values
    assert values["ppml_front_oversized_bodies_total"] >= 1, values
    assert "ppml_front_overloaded_total" in values
