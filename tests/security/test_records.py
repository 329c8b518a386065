"""No record can kill a worker: arbitrary bytes and arbitrary tensor headers, in standard and
end-to-end sealed mode, through the worker's real record path (real AES-GCM, real X25519, the
real ONNX Runtime engine). The queue is a stand-in that records what would be posted."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppml_serve.codecs import record
from ppml_serve.crypto.e2e import ClientSession, WorkerKey
from ppml_serve.crypto.envelope import REPLY, REQUEST, Keyring, associated_data
from ppml_serve.engines import load_engine
from ppml_serve.errors import ProtocolError
from ppml_serve.models import demo_model_path
from ppml_serve.queue.contract import Delivery, Mode, Reply
from ppml_serve.settings import WorkerSettings
from ppml_serve.worker.service import Worker

KEYRING = Keyring({"k1": os.urandom(32)}, "k1")
WORKER_KEY = X25519PrivateKey.generate()
ENGINE = load_engine("demo", demo_model_path().read_bytes(), threads=1)


class RecordingBroker:
    """Stands in for Redis: keeps the replies a worker posts."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.seen: dict[str, str] = {}

    def finish(self, replies: Sequence[Reply]) -> int:
        self.replies.extend(replies)
        return len(replies)

    def drop(self, deliveries: Sequence[Delivery]) -> None:
        pass

    def remember_once(self, token: str, owner: str, ttl_ms: int) -> bool:
        """End-to-end replay refusal, as Redis keeps it (SET NX; the same owner may redo)."""
        return self.seen.setdefault(token, owner) == owner

    def __getattr__(self, name: str) -> Any:  # the rest of the contract is not used here
        raise AssertionError(f"unexpected broker call {name}")


def _worker() -> tuple[Worker, RecordingBroker]:
    broker = RecordingBroker()
    worker = Worker("demo", ENGINE, broker, broker, KEYRING,  # type: ignore[arg-type]
                    WorkerSettings(max_rows_per_request=64),
                    worker_key=WorkerKey(WORKER_KEY))
    return worker, broker


def _framed(header: Any, payload: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<3sI", b"PT\x01", len(encoded)) + encoded + payload


def _deliver(worker: Worker, plaintext: bytes, mode: Mode, request_id: str) -> None:
    if mode is Mode.SEALED:
        plaintext = ClientSession(WorkerKey(WORKER_KEY).public).seal_request(plaintext, "demo")
    body = KEYRING.seal(plaintext, associated_data("demo", request_id, REQUEST))
    good = record.pack({"image": np.zeros((1, 8, 8), np.uint8)})
    mates = [Delivery("2-0", "mate", "ppml:{demo}:reply:t",
                      KEYRING.seal(good, associated_data("demo", "mate", REQUEST)), 0)]
    worker.process([Delivery("1-0", request_id, "ppml:{demo}:reply:t", body, 0, mode=mode), *mates])


def _check_answers(broker: RecordingBroker, request_id: str) -> None:
    by_id = {reply.delivery.request_id: reply for reply in broker.replies}
    assert set(by_id) == {request_id, "mate"}, "every item gets exactly one answer"
    mate = by_id["mate"]
    assert mate.ok, "a batch-mate of a bad record is answered normally"
    reply = by_id[request_id]
    plaintext = KEYRING.open(reply.body, associated_data("demo", request_id, REPLY))
    if not reply.ok:
        assert json.loads(plaintext)["kind"] in {"protocol", "invalid_input", "integrity"}


DIMENSION = st.one_of(st.integers(-5, 70), st.integers(2**31 - 2, 2**70), st.floats(),
                      st.booleans(), st.text(max_size=3), st.none())
TENSOR = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("image"), st.text(max_size=5), st.integers()),
    "datatype": st.one_of(st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", "x"]),
                          st.integers()),
    "shape": st.one_of(st.lists(DIMENSION, max_size=20), st.text(max_size=3), st.integers()),
})
HEADER = st.one_of(
    st.fixed_dictionaries({"meta": st.one_of(st.just({}), st.integers(), st.text(max_size=3)),
                           "tensors": st.one_of(st.lists(TENSOR, max_size=4), st.integers())}),
    st.lists(st.integers(), max_size=3), st.text(max_size=10), st.integers())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=HEADER, payload=st.binary(max_size=2048), sealed=st.booleans())
def test_arbitrary_headers_only_produce_per_item_errors(header: Any, payload: bytes,
                                                        sealed: bool) -> None:
    worker, broker = _worker()
    _deliver(worker, _framed(header, payload), Mode.SEALED if sealed else Mode.STANDARD, "bad")
    _check_answers(broker, "bad")


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=4096), sealed=st.booleans())
def test_arbitrary_bytes_only_produce_per_item_errors(data: bytes, sealed: bool) -> None:
    worker, broker = _worker()
    _deliver(worker, data, Mode.SEALED if sealed else Mode.STANDARD, "bad")
    _check_answers(broker, "bad")


def test_the_findings_that_killed_a_worker() -> None:
    """Dimension 2**63 and +-Infinity in an end-to-end record's header; 150,000 rows."""
    for shape in ([2**63, 8, 8], [float("inf"), 8, 8], [-float("inf")], [0, 2**70, 8]):
        worker, broker = _worker()
        _deliver(worker, _framed({"meta": {}, "tensors": [
            {"name": "image", "datatype": "UINT8", "shape": shape}]}, b""), Mode.SEALED, "bad")
        _check_answers(broker, "bad")
        assert not broker.replies[0].ok
    worker, broker = _worker()
    _deliver(worker, record.pack({"image": np.zeros((150_000, 8, 8), np.uint8)}),
             Mode.SEALED, "rows")
    reply = next(r for r in broker.replies if r.delivery.request_id == "rows")
    problem = json.loads(KEYRING.open(reply.body, associated_data("demo", "rows", REPLY)))
    assert not reply.ok and "at most 64" in problem["error"]


def test_record_unpack_refuses_what_numpy_cannot_hold() -> None:
    for shape in ([2**63], [1e30], ["8"], [True], [2**31] * 2):
        data = _framed({"meta": {}, "tensors": [{"name": "x", "datatype": "UINT8",
                                                 "shape": shape}]}, b"")
        try:
            record.unpack(data)
        except ProtocolError:
            continue
        raise AssertionError(f"shape {shape} was accepted")
    nested = b"[" * 100_000 + b"]" * 100_000
    try:
        record.unpack(struct.pack("<3sI", b"PT\x01", len(nested)) + nested)
    except ProtocolError:
        pass
    else:
        raise AssertionError("a deeply nested header was accepted")
