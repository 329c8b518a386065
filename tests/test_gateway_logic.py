"""The app's control routes and the data plane's caches around the queue (Redis down -> 503,
shared lookups, statistics, Triton extensions it does not serve); inference is the native
front's (``test_native_path.py``), and a request of it that reaches the app is told to retry.

A stand-in broker replaces Redis here (logic only); the real queue is covered end to end.
"""

from __future__ import annotations

import json
import os
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
from ppml_serve.queue.contract import HostStatus, ModelState
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

    async def attestations(self, model: str) -> list[str]:
        return []

    async def model_states(self) -> dict[str, ModelState]:
        return {}

    async def request_model_state(self, model: str, action: str) -> ModelState:
        return ModelState(action, 1)

    async def host_statuses(self, max_age_s: float) -> list[HostStatus]:
        if self.down:
            raise NotReady("queue unreachable: ConnectionError")
        return []


def client_for(broker: StandInBroker, tmp_path: Path,
               **gateway: object) -> tuple[TestClient, str]:
    token = add_api_key(tmp_path / "keys.json", "test", ["*"])
    settings = GatewaySettings(**gateway)  # type: ignore[arg-type]
    plane = DataPlane(broker, KEYRING, settings, worker_max_age_s=1.0)
    app = create_app(plane, ApiKeyStore.load(tmp_path / "keys.json"), Metrics(), None)
    return TestClient(app), token


BODY = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                    "data": np.zeros(64, np.uint8).tolist()}]}


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/models/demo/ready"])
def test_queue_down_is_503(tmp_path: Path, path: str) -> None:
    broker = StandInBroker()
    client, token = client_for(broker, tmp_path)
    with client:
        broker.down = True
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/models/demo/infer"), ("POST", "/v2/models/demo/versions/1/infer"),
    ("POST", "/v2/models/demo/jobs"), ("GET", "/v2/models/demo/jobs/abc"),
    ("POST", "/v2/models/demo/infer-sealed")])
def test_inference_that_reaches_the_app_is_told_to_retry(tmp_path: Path, method: str,
                                                         path: str,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """The front answers inference itself and passes none of it on; should one reach the
    app (a bug), the caller is told to retry and the error log says so."""
    client, token = client_for(StandInBroker(), tmp_path)
    with client:
        response = client.request(method, path, json=BODY,
                                  headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()) == (
        503, {"error": "the gateway is starting or stopping: retry"})
    assert response.headers["retry-after"] == "1"
    assert f"the front passed {method} {path} on" in caplog.text


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
