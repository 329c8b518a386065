"""Overload and missing workers, for real: a 500-connection burst, and a model whose last
worker died. Only 200 / 429 / 503 (with Retry-After) may come back, at once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_samples
from ppml_serve.state import read_api_key

from .conftest import running_stack, stack_settings

BURST = 500
RSS_GROWTH_BOUND_MB = 96
"""How far above its warm baseline the gateway's memory may stay after a burst."""

IMAGES, _ = demo_samples()
BODY = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                    "data": IMAGES[0].ravel().tolist()}]}


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One worker, and a gateway that admits 32 requests at once (16 per model)."""
    settings = stack_settings(tmp_path_factory.mktemp("overload"), gateway={
        "port": 0, "request_timeout_s": 10, "max_inflight": 32, "max_inflight_per_model": 16})
    with running_stack(settings) as local:
        yield local


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _burst(stack: LocalStack, connections: int) -> list[httpx.Response | Exception]:
    headers = {"Authorization": f"Bearer {read_api_key(stack.settings.state_dir)}"}
    clients = [httpx.AsyncClient(base_url=stack.url, verify=str(stack.settings.ca_file),
                                 headers=headers, timeout=30) for _ in range(connections)]
    try:
        return list(await asyncio.gather(
            *(client.post("/v2/models/demo/infer", json=BODY) for client in clients),
            return_exceptions=True))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def test_burst_of_500_connections_gets_only_200_429_503(small_gateway: LocalStack) -> None:
    assert small_gateway.gateway is not None and small_gateway.gateway.process is not None
    pid = small_gateway.gateway.process.pid
    asyncio.run(_burst(small_gateway, 32))  # warm: TLS contexts, pools, caches
    baseline = _rss_mb(pid)
    results = asyncio.run(_burst(small_gateway, BURST))
    statuses = Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__
                       for r in results)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    for response in results:
        if isinstance(response, httpx.Response) and response.status_code in (429, 503):
            assert response.headers.get("retry-after"), response.text
    time.sleep(1.0)
    after = _rss_mb(pid)
    assert after - baseline < RSS_GROWTH_BOUND_MB, f"RSS {baseline:.0f} -> {after:.0f} MB"
    with httpx.Client(base_url=small_gateway.url, verify=str(small_gateway.settings.ca_file),
                      headers={"Authorization":
                               f"Bearer {read_api_key(small_gateway.settings.state_dir)}"}
                      ) as http:
        assert http.post("/v2/models/demo/infer", json=BODY).status_code == 200


def test_model_whose_worker_died_gets_503_at_once(small_gateway: LocalStack) -> None:
    (worker,) = [c for c in small_gateway.children if c.name.startswith("worker")]
    assert worker.process is not None
    headers = {"Authorization": f"Bearer {read_api_key(small_gateway.settings.state_dir)}"}
    worker.process.send_signal(signal.SIGKILL)
    worker.wait(5)
    started = time.monotonic()
    timings: list[tuple[int, float]] = []
    with httpx.Client(base_url=small_gateway.url, verify=str(small_gateway.settings.ca_file),
                      headers=headers, timeout=30) as http:
        while time.monotonic() - started < 3.0:  # across the moment the death is noticed
            sent = time.monotonic()
            response = http.post("/v2/models/demo/infer", json=BODY)
            timings.append((response.status_code, time.monotonic() - sent))
            assert response.headers.get("retry-after") is not None
        ready = http.get("/v2/models/demo/ready")
    assert {status for status, _ in timings} == {503}, timings
    dead_after = small_gateway.settings.worker.dead_after_s
    assert max(elapsed for _, elapsed in timings) < dead_after + 1.5, timings
    assert ready.status_code == 503
    worker.start(small_gateway._env)  # leave the module's stack as it was found
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with httpx.Client(base_url=small_gateway.url, headers=headers,
                          verify=str(small_gateway.settings.ca_file)) as http:
            if http.get("/v2/models/demo/ready").status_code == 200:
                break
        time.sleep(0.2)


def test_rows_are_answered_correctly_after_the_burst(small_gateway: LocalStack) -> None:
    headers = {"Authorization": f"Bearer {read_api_key(small_gateway.settings.state_dir)}"}
    with httpx.Client(base_url=small_gateway.url, verify=str(small_gateway.settings.ca_file),
                      headers=headers, timeout=30) as http:
        response = http.post("/v2/models/demo/infer", json=BODY)
    assert response.status_code == 200
    assert np.asarray(response.json()["outputs"][0]["data"]).shape == (10,)
