"""Tracing: a caller's W3C traceparent is continued through gateway, queue and worker; the
context rides in the record's clear header, and spans hold no payload.

In process with the SDK's in-memory exporter (the worker's record path), and end to end
through real processes with the SDK's JSON-lines exporter (the gateway's spans are the native
front's)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ppml_serve.codecs import record
from ppml_serve.crypto.envelope import REQUEST, Keyring, associated_data
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.queue.contract import Delivery
from ppml_serve.settings import WorkerSettings
from ppml_serve.state import read_api_key
from ppml_serve.tracing import install
from ppml_serve.worker.service import Worker

from .conftest import running_stack, stack_settings
from .security.test_records import RecordingBroker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
IMAGES, _ = demo_samples()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
    install(provider)  # spans on (OpenTelemetry keeps the first provider it was given)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_worker_spans_hang_under_the_gateway_span(spans: InMemorySpanExporter) -> None:
    keyring = Keyring({"k": os.urandom(32)}, "k")
    broker = RecordingBroker()
    worker = Worker("demo", load_engine("demo", demo_model_path().read_bytes(), threads=1),
                    broker, broker, keyring, WorkerSettings())  # type: ignore[arg-type]
    body = keyring.seal(record.pack({"image": IMAGES[:2]}),
                        associated_data("demo", "r1", REQUEST))
    spans.clear()
    worker.process([Delivery("1-0", "r1", "ppml:{demo}:reply:t", body, 0,
                             enqueued_ms=int(time.time() * 1000) - 5, traceparent=PARENT)])
    recorded = {span.name: span for span in spans.get_finished_spans()}
    assert {"queue wait", "open", "batch", "infer", "seal"} <= set(recorded)
    for span in recorded.values():
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert recorded["queue wait"].end_time - recorded["queue wait"].start_time >= 4_000_000
    assert broker.replies[0].ok


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Path]]:
    state = tmp_path_factory.mktemp("traced")
    spans_file = state / "spans.jsonl"
    settings = stack_settings(state, tracing={"exporter": "file", "file": spans_file})
    with running_stack(settings) as local:
        yield local, spans_file


def _native_answers(stack: LocalStack) -> int:
    response = httpx.get(f"{stack.url}/metrics", verify=str(stack.settings.ca_file),
                         headers={"Authorization":
                                  f"Bearer {read_api_key(stack.settings.state_dir)}"})
    line = next(line for line in response.text.splitlines()
                if line.startswith("ppml_front_native_answers_total "))
    return int(float(line.split()[1]))


def _spans_of(spans_file: Path, trace_id: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 10
    mine: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = spans_file.read_text().splitlines() if spans_file.exists() else []
        mine = [s for s in map(json.loads, lines) if s["context"]["trace_id"] == "0x" + trace_id]
        if wanted <= {s["name"] for s in mine}:
            break
        time.sleep(0.2)
    return {str(s["name"]): s for s in mine}


def test_one_request_traced_through_real_processes(traced: tuple[LocalStack, Path]) -> None:
    stack, spans_file = traced
    answered_before = _native_answers(stack)
    marker = b"TRACE-MARKER-77a1"
    image = np.frombuffer((marker * 4)[:64], dtype=np.uint8).reshape(1, 8, 8)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                        "data": image.ravel().tolist()}]}
    trace_id = os.urandom(16).hex()
    headers = {"Authorization": f"Bearer {read_api_key(stack.settings.state_dir)}",
               "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    response = httpx.post(f"{stack.url}/v2/models/demo/infer", json=body, headers=headers,
                          verify=str(stack.settings.ca_file))
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    mine: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = spans_file.read_text().splitlines() if spans_file.exists() else []
        mine = [s for s in map(json.loads, lines) if s["context"]["trace_id"] == "0x" + trace_id]
        if {"wait", "seal", "queue wait", "infer"} <= {s["name"] for s in mine}:
            break
        time.sleep(0.2)
    by_name = {str(s["name"]): s for s in mine}
    assert {"POST /v2/models/{model}/infer", "admit", "seal", "enqueue", "wait", "queue wait",
            "open", "infer"} <= set(by_name), sorted(by_name)
    enqueue_id = by_name["enqueue"]["context"]["span_id"]
    assert by_name["queue wait"]["parent_id"] == enqueue_id
    # the front answered it (traced requests take the native path) and its spans hang
    # under the caller's, with the app's attributes
    assert _native_answers(stack) == answered_before + 1
    server = by_name["POST /v2/models/{model}/infer"]
    assert server["parent_id"] == "0x00f067aa0ba902b7" and server["kind"] == "SpanKind.SERVER"
    assert {"http.route": "/v2/models/{model}/infer", "ppml.model": "demo",
            "http.response.status_code": 200}.items() <= server["attributes"].items()
    assert by_name["seal"]["parent_id"] == by_name["admit"]["context"]["span_id"]
    for child in ("admit", "enqueue", "wait"):
        assert by_name[child]["parent_id"] == server["context"]["span_id"], child
    services = {s["resource"]["attributes"]["service.name"] for s in mine}
    assert services == {"ppml-serve-gateway", "ppml-serve-worker"}
    text = spans_file.read_text()
    assert marker.decode() not in text and marker.hex() not in text


def test_a_grpc_call_and_a_new_trace_are_traced_on_the_native_path(
        traced: tuple[LocalStack, Path]) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    stack, spans_file = traced
    key = read_api_key(stack.settings.state_dir)
    before = _native_answers(stack)
    trace_id = os.urandom(16).hex()
    request = pb.ModelInferRequest(model_name="demo")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8])
    request.raw_input_contents.append(IMAGES[:1].tobytes())
    credentials = grpc.ssl_channel_credentials(stack.settings.ca_file.read_bytes())
    with grpc.secure_channel(stack.grpc_address, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request, timeout=10, metadata=(
            ("authorization", f"Bearer {key}"),
            ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
    by_name = _spans_of(spans_file, trace_id, {"gRPC ModelInfer", "queue wait", "infer"})
    assert {"gRPC ModelInfer", "admit", "seal", "enqueue", "wait", "queue wait",
            "infer"} <= set(by_name), sorted(by_name)
    assert by_name["gRPC ModelInfer"]["parent_id"] == "0x00f067aa0ba902b7"
    assert by_name["queue wait"]["parent_id"] == by_name["enqueue"]["context"]["span_id"]
    # no caller's context: a new trace (sample_ratio 1), begun by the front
    response = httpx.post(f"{stack.url}/v2/models/demo/infer", verify=str(stack.settings.ca_file),
                          headers={"Authorization": f"Bearer {key}"}, json={"inputs": [
                              {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                               "data": IMAGES[:1].ravel().tolist()}]})
    assert response.status_code == 200
    assert _native_answers(stack) == before + 2
    deadline = time.monotonic() + 10
    roots: list[dict[str, Any]] = []
    while not roots and time.monotonic() < deadline:
        lines = spans_file.read_text().splitlines()
        roots = [s for s in map(json.loads, lines)
                 if s["name"] == "POST /v2/models/{model}/infer" and s["parent_id"] is None]
        time.sleep(0.1)
    assert roots, "the new trace's server span was not recorded"
    new_trace = roots[-1]["context"]["trace_id"][2:]
    assert {"admit", "enqueue", "wait", "queue wait"} <= set(
        _spans_of(spans_file, new_trace, {"queue wait"}))


def test_the_span_file_is_rotated_and_private(tmp_path: Path) -> None:
    # found: the trace file grew without rotation (43 MB for 7,500 requests)
    from ppml_serve.tracing import _file_exporter

    path = tmp_path / "spans.jsonl"
    exporter = _file_exporter(path, max_bytes=1 << 16, backups=2)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for index in range(600):
        with tracer.start_as_current_span(f"span {index}", attributes={"pad": "x" * 200}):
            pass
    files = sorted(tmp_path.glob("spans.jsonl*"))
    assert [f.name for f in files] == ["spans.jsonl", "spans.jsonl.1", "spans.jsonl.2"]
    assert all(f.stat().st_size <= (1 << 16) + 2048 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for f in files:  # every line a whole span
        assert all(json.loads(line)["name"].startswith("span ")
                   for line in f.read_text().splitlines())
