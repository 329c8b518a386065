"""Gateway status mapping around the queue: backlog -> 429, no answer -> 504, Redis down -> 503.

A stand-in broker replaces Redis here (logic only); the real queue is covered end to end.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.crypto.envelope import SPEC as ENVELOPE_SPEC
from ppml_serve.crypto.envelope import Keyring, associated_data
from ppml_serve.errors import NotReady
from ppml_serve.gateway.app import Metrics, create_app
from ppml_serve.gateway.auth import ApiKeyStore, add_api_key
from ppml_serve.gateway.dataplane import DataPlane
from ppml_serve.queue.contract import HostStatus, Job, Mode, ModelState, ReplyMessage
from ppml_serve.settings import GatewaySettings

SPEC = ModelSpec("demo", (TensorSpec("image", "UINT8", (-1, 8, 8)),),
                 (TensorSpec("probabilities", "FP32", (-1, 10)),))
KEYRING = Keyring({"k": os.urandom(32)}, "k")
"""The data key the stand-in workers and the gateway share."""


class StandInBroker:
    """Answers nothing; reports a configurable backlog; can be 'down'."""

    def __init__(self, backlog: int = 0, down: bool = False) -> None:
        self._backlog = backlog
        self.down = down
        self.enqueued: list[str] = []
        self.deadlines_ms: list[int] = []
        self.traceparents: list[str] = []
        self.jobs: dict[str, Job] = {}
        self.stream = "ppml:{demo}:reply:test"

    async def ping(self) -> None:
        if self.down:
            raise NotReady("queue unreachable: ConnectionError")

    async def close(self) -> None:
        pass

    async def models(self) -> dict[str, bytes]:
        # as workers announce it: sealed
        return {"demo": KEYRING.for_model("demo").seal(json.dumps(SPEC.as_json()).encode(),
                                                       associated_data("demo", "", ENVELOPE_SPEC))}

    async def live_workers(self, model: str, max_age_s: float) -> int:
        return 1

    async def backlog(self, model: str) -> int:
        return self._backlog

    async def enqueue(self, model: str, request_id: str, body: bytes, deadline_ms: int,
                      mode: Mode = Mode.STANDARD, job_ttl_s: int = 0,
                      traceparent: str = "") -> None:
        if self.down:
            raise NotReady("queue unreachable: ConnectionError")
        self.enqueued.append(request_id)
        self.deadlines_ms.append(deadline_ms)
        self.traceparents.append(traceparent)

    def reply_stream(self, model: str) -> str:
        return self.stream

    async def read_replies(self, model: str, block_ms: int,
                           count: int = 512) -> list[ReplyMessage]:
        import asyncio

        await asyncio.sleep(block_ms / 1000)
        return []

    async def attestations(self, model: str) -> list[str]:
        return []

    async def save_job(self, job_id: str, job: Job, ttl_s: int) -> None:
        self.jobs[job_id] = job

    async def load_job(self, model: str, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def model_states(self) -> dict[str, ModelState]:
        return {}

    async def request_model_state(self, model: str, action: str) -> ModelState:
        return ModelState(action, 1)

    async def host_statuses(self, max_age_s: float) -> list[HostStatus]:
        if self.down:
            raise NotReady("queue unreachable: ConnectionError")
        return []


def client_for(broker: StandInBroker, tmp_path: Path, behind_front: bool = False,
               **gateway: object) -> tuple[TestClient, str]:
    token = add_api_key(tmp_path / "keys.json", "test", ["*"])
    settings = GatewaySettings(**gateway)  # type: ignore[arg-type]
    plane = DataPlane(broker, KEYRING, settings,
                      worker_max_age_s=1.0)
    app = create_app(plane, ApiKeyStore.load(tmp_path / "keys.json"), 1 << 20, Metrics(),
                     behind_front=behind_front)
    return TestClient(app), token


BODY = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                    "data": np.zeros(64, np.uint8).tolist()}]}


def test_backlog_over_bound_is_429_with_retry_after(tmp_path: Path) -> None:
    broker = StandInBroker(backlog=5)
    client, token = client_for(broker, tmp_path, max_queue_length=5)
    with client:
        response = client.post("/v2/models/demo/infer", json=BODY,
                               headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert "queued requests" in response.json()["error"]
    assert broker.enqueued == [], "an overloaded gateway must not enqueue"


def test_no_answer_in_time_is_504(tmp_path: Path) -> None:
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path, request_timeout_s=0.3)
    with client:
        response = client.post("/v2/models/demo/infer", json=BODY,
                               headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 504
    assert response.json() == {"error": "no answer from model 'demo' within 0.3 s"}
    assert len(broker.enqueued) == 1


def _received_ms_ago(seconds: float) -> dict[str, str]:
    return {"x-ppml-received-ms": str(int((time.time() - seconds) * 1000))}


def test_deadline_counts_from_when_the_front_received_the_request(tmp_path: Path) -> None:
    # found: with 400 clients some answers took 32 s, past the 30 s deadline, because the
    # time a request waited before the gateway started on it was not counted
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path, behind_front=True, request_timeout_s=2.0)
    auth = {"Authorization": f"Bearer {token}"}
    with client:
        started = time.monotonic()
        late = client.post("/v2/models/demo/infer", json=BODY,
                           headers={**auth, **_received_ms_ago(0.8)})
        waited = time.monotonic() - started
        saturated = client.post("/v2/models/demo/infer", json=BODY,
                                headers={**auth, **_received_ms_ago(1.5)})
    assert late.status_code == 504 and waited < 1.6, (late.status_code, waited)
    received_ms = int(time.time() * 1000) - int(waited * 1000) - 800
    assert abs(broker.deadlines_ms[0] - (received_ms + 2000)) < 400, broker.deadlines_ms
    assert saturated.status_code == 429 and saturated.headers["Retry-After"] == "1"
    assert "waited 1.5 s before it could be started" in saturated.json()["error"]
    assert len(broker.enqueued) == 1, "a request refused at admission is not queued"


def test_the_front_header_is_ignored_without_the_front(tmp_path: Path) -> None:
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path, request_timeout_s=0.3)
    with client:  # a client cannot shorten (or stretch) its deadline through the header
        response = client.post("/v2/models/demo/infer", json=BODY,
                               headers={"Authorization": f"Bearer {token}",
                                        **_received_ms_ago(100)})
    assert response.status_code == 504


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/models/demo/infer"])
def test_queue_down_is_503(tmp_path: Path, path: str) -> None:
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path)
    with client:
        broker.down = True
        headers = {"Authorization": f"Bearer {token}"}
        if path.endswith("infer"):
            response = client.post(path, json=BODY, headers=headers)
        else:
            response = client.get(path, headers=headers)
    assert response.status_code == 503


def test_forbidden_model_for_scoped_key(tmp_path: Path) -> None:
    scoped = add_api_key(tmp_path / "keys.json", "scoped", ["other"])
    client, _ = client_for(StandInBroker(), tmp_path)
    with client:
        response = client.post("/v2/models/demo/infer", json=BODY,
                                   headers={"Authorization": f"Bearer {scoped}"})
    assert response.status_code == 403
    assert response.json() == {"error": "this API key may not use this model"}


def test_jobs_are_private_to_their_key_and_pending_until_answered(tmp_path: Path) -> None:
    other = add_api_key(tmp_path / "keys.json", "other", ["*"])
    client, token = client_for(StandInBroker(), tmp_path)
    with client:
        submitted = client.post("/v2/models/demo/jobs", json=BODY,
                                headers={"Authorization": f"Bearer {token}"})
        assert submitted.status_code == 202
        job_id = submitted.json()["job_id"]
        assert submitted.headers["Location"] == f"/v2/models/demo/jobs/{job_id}"
        mine = client.get(f"/v2/models/demo/jobs/{job_id}",
                          headers={"Authorization": f"Bearer {token}"})
        theirs = client.get(f"/v2/models/demo/jobs/{job_id}",
                            headers={"Authorization": f"Bearer {other}"})
    assert mine.status_code == 202 and mine.json()["state"] == "pending"
    assert theirs.status_code == 404


class CountingBroker(StandInBroker):
    """Counts how often the gateway asks for what it caches; each answer takes a while."""

    def __init__(self) -> None:
        super().__init__()
        self.host_reads = 0
        self.fail_next = False

    async def host_statuses(self, max_age_s: float) -> list[HostStatus]:
        import asyncio

        self.host_reads += 1
        await asyncio.sleep(0.05)
        if self.fail_next:
            self.fail_next = False
            raise NotReady("queue unreachable: ConnectionError")
        return []


def test_concurrent_requests_share_one_lookup_and_failures_are_not_cached() -> None:
    import asyncio

    async def scenario() -> None:
        broker = CountingBroker()
        plane = DataPlane(broker, Keyring({"k": os.urandom(32)}, "k"), GatewaySettings(),
                          worker_max_age_s=1.0)
        views = await asyncio.gather(*(plane.repository() for _ in range(32)))
        assert broker.host_reads == 1, "32 concurrent callers must share one Redis read"
        assert all(view is views[0] for view in views)

        broker.fail_next = True
        results = await asyncio.gather(*(plane.repository(refresh=True) for _ in range(4)),
                                       return_exceptions=True)
        assert all(isinstance(result, NotReady) for result in results)
        await plane.repository()
        assert broker.host_reads == 3, "a failed read is not cached: the next caller reads again"

    asyncio.run(scenario())


def _compressed(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(data) + packer.flush()


def test_gzip_and_deflate_bodies_are_decoded_and_held_to_the_limit(tmp_path: Path) -> None:
    # found: tritonclient's request compression was answered "not valid JSON"
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path, request_timeout_s=0.2)
    body = json.dumps(BODY).encode()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with client:
        answers = {encoding: client.post("/v2/models/demo/infer",
                                         content=_compressed(body, wbits),
                                         headers={**auth, "Content-Encoding": encoding})
                   for encoding, wbits in (("gzip", 31), ("deflate", 15))}
        bomb = client.post("/v2/models/demo/infer",
                           content=_compressed(b"[" + b"0," * (1 << 20) + b"0]", 31),
                           headers={**auth, "Content-Encoding": "gzip"})
        broken = client.post("/v2/models/demo/infer", content=b"\x1f\x8bnot gzip",
                             headers={**auth, "Content-Encoding": "gzip"})
        unknown = client.post("/v2/models/demo/infer", content=body,
                              headers={**auth, "Content-Encoding": "br"})
    # decoded and queued (the stand-in workers never answer: 504)
    assert [a.status_code for a in answers.values()] == [504, 504]
    assert len(broker.enqueued) == 2
    assert bomb.status_code == 413 and "once decompressed" in bomb.json()["error"]
    assert broken.status_code == 400 and "not valid gzip" in broken.json()["error"]
    assert unknown.status_code == 415 and "'br' is not supported" in unknown.json()["error"]


def test_statistics_of_every_model_and_clear_words_for_unsupported_extensions(
        tmp_path: Path) -> None:
    # found: get_inference_statistics() for all models answered 404 "model 'stats' is not
    # served here"; shared memory, trace and log settings answered "no such endpoint"
    client, token = client_for(StandInBroker(), tmp_path)
    auth = {"Authorization": f"Bearer {token}"}
    with client:
        stats = client.get("/v2/models/stats", headers=auth)
        unsupported = [client.post(path, headers=auth, json={}) for path in (
            "/v2/systemsharedmemory/region/r/register", "/v2/cudasharedmemory/status",
            "/v2/trace/setting", "/v2/models/demo/trace/setting", "/v2/logging")]
        missing = client.get("/v2/no/such/thing", headers=auth)
    assert stats.status_code == 200
    assert [row["name"] for row in stats.json()["model_stats"]] == ["demo"]
    assert all(r.status_code == 501 and "not supported" in r.json()["error"]
               for r in unsupported), [r.text for r in unsupported]
    assert missing.status_code == 404


def test_a_callers_request_id_is_kept_but_never_used_as_the_queue_id(tmp_path: Path) -> None:
    # found: a caller's X-Request-ID was replaced; it must not become the queue record's id
    # either (a repeated one would collide with another caller's request)
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path, request_timeout_s=0.2)
    auth = {"Authorization": f"Bearer {token}"}
    with client:
        kept = client.post("/v2/models/demo/infer", json=BODY,
                           headers={**auth, "X-Request-ID": "trace-42.a"})
        unsafe = client.post("/v2/models/demo/infer", json=BODY,
                             headers={**auth, "X-Request-ID": "x" * 65})
    assert kept.headers["X-Request-ID"] == "trace-42.a"
    assert unsafe.headers["X-Request-ID"] != "x" * 65
    assert "trace-42.a" not in broker.enqueued and len(set(broker.enqueued)) == 2
