"""Workers as Ray actors on a real local multi-node Ray cluster (ray.cluster_utils.Cluster,
one CPU per node so that two actors must land on two nodes): requests served from more than
one node; a node removed under load loses nothing; the pool grows under closed-loop clients
and shrinks when they stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from ppml_serve.bench.faults import SteadyLoad, summarize, wait_until
from ppml_serve.client import Client
from ppml_serve.cluster.ray_pool import (
    Autoscaler,
    PoolSpec,
    RayWorkerPool,
    queue_stats_source,
)
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.queue.contract import QueueStats
from ppml_serve.queue.redis_common import live_workers_sync
from ppml_serve.state import read_api_key

from .conftest import stack_settings

IMAGES, _ = demo_samples()


@dataclass
class RayStack:
    cluster: Cluster
    stack: LocalStack

    def pool(self, **options: Any) -> RayWorkerPool:
        settings = self.stack.settings
        spec = PoolSpec("demo", demo_model_path(), settings.state_dir / "run-config.yaml",
                        settings.state_dir, **options)
        return RayWorkerPool(spec, queue_stats_source(settings, "demo"))

    def live_workers(self) -> int:
        settings = self.stack.settings
        return live_workers_sync(self.stack.redis.url, settings.ca_file, settings.redis.prefix,
                                 "demo", settings.worker.dead_after_s)

    def client(self) -> Client:
        return Client(self.stack.url, api_key=read_api_key(self.stack.settings.state_dir),
                      ca_file=self.stack.settings.ca_file)


@pytest.fixture(scope="module")
def ray_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayStack]:
    """Redis, key broker and gateway as usual; no worker but the Ray actors."""
    settings = stack_settings(tmp_path_factory.mktemp("ray"),
                              gateway={"port": 0, "request_timeout_s": 15})
    stack = LocalStack(settings, workers=1, log_level="WARNING", unserved=frozenset({"demo"}))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        stack.start()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield RayStack(cluster, stack)
    finally:
        ray.shutdown()
        cluster.shutdown()
        stack.stop()


def _wait(condition: Any, timeout_s: float = 90) -> bool:
    return wait_until(condition, timeout_s)


def test_actors_on_two_nodes_serve_and_a_lost_node_loses_nothing(ray_stack: RayStack) -> None:
    node = ray_stack.cluster.add_node(num_cpus=1)
    pool = ray_stack.pool(min_replicas=2, max_replicas=2)
    pool.scale_to(2)
    assert len(set(pool.nodes())) == 2, "two actors with one CPU each need two nodes"
    assert _wait(lambda: ray_stack.live_workers() == 2)
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": IMAGES[:8]})["probabilities"].argmax(axis=1)
    with ray_stack.client() as client:
        predicted = client.infer("demo", IMAGES[:8])["probabilities"].argmax(axis=1)
    assert np.array_equal(predicted, expected)

    settings = ray_stack.stack.settings
    with SteadyLoad(ray_stack.stack.url, read_api_key(settings.state_dir),
                    str(settings.ca_file), 8, settings.gateway.request_timeout_s + 5) as load:
        time.sleep(1.5)
        removed = time.monotonic()
        ray_stack.cluster.remove_node(node, allow_graceful=False)
        time.sleep(4)
    report = summarize("ray-node-removed", load.outcomes, removed,
                       settings.gateway.request_timeout_s)
    assert report.sent > 20 and report.wrong == 0 and report.lost == 0, report
    assert set(report.errors) <= {"503"} and report.connection_refused == 0, report
    assert report.ok > 0.9 * report.sent, report
    pool.scale_to(0)


def test_pool_grows_under_closed_loop_clients_and_shrinks_when_idle(ray_stack: RayStack) -> None:
    """32 clients that each wait for their answer before sending again: the backlog (lag +
    pending: what workers hold counts too) grows the pool, and idleness shrinks it."""
    ray_stack.cluster.add_node(num_cpus=1)
    pool = ray_stack.pool(min_replicas=1, max_replicas=2, target_backlog=8,
                          scale_up_cooldown_s=0, scale_down_cooldown_s=2)
    pool.scale_to(1)
    assert _wait(lambda: ray_stack.live_workers() >= 1)
    stats = queue_stats_source(ray_stack.stack.settings, "demo")
    heavy = np.tile(IMAGES[:64], (4, 1, 1))  # 256 rows: the engine, not the gateway, is busy
    stop = threading.Event()
    answered: list[int] = []

    def closed_loop() -> None:
        with ray_stack.client() as client:
            while not stop.is_set():
                answered.append(len(client.infer("demo", heavy)["probabilities"]))

    clients = [threading.Thread(target=closed_loop, daemon=True) for _ in range(32)]
    samples: list[QueueStats] = []

    def grown() -> bool:
        samples.append(stats())
        return pool.step() == 2

    for thread in clients:
        thread.start()
    try:
        grew = _wait(grown, timeout_s=40)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    assert grew, f"the pool did not grow under 32 closed-loop clients: {samples[-5:]}"
    assert any(sample.pending for sample in samples), "workers held none of the requests"
    assert answered and set(answered) == {256}
    assert _wait(lambda: pool.step() == 1, timeout_s=30), "the pool did not shrink when idle"
    pool.scale_to(0)


def test_the_autoscaler_counts_requests_workers_hold() -> None:
    """The finding: 32 closed-loop clients, all their requests taken by prefetching workers,
    lag 0. Sized on the backlog, the pool grows; with nothing unanswered it shrinks."""
    clock = [0.0]
    spec = PoolSpec("demo", demo_model_path(), min_replicas=1, max_replicas=8,
                    target_backlog=16, scale_up_cooldown_s=0, scale_down_cooldown_s=10)
    scaler = Autoscaler(spec, clock=lambda: clock[0])
    assert scaler.desired(1, QueueStats(depth=32, lag=0, pending=32, live_workers=1)) == 2
    assert scaler.desired(2, QueueStats(depth=40, lag=20, pending=30, live_workers=2)) == 4
    clock[0] = 5.0
    assert scaler.desired(4, QueueStats(depth=0, lag=0, pending=0, live_workers=4)) == 4
    clock[0] = 20.0
    assert scaler.desired(4, QueueStats(depth=0, lag=0, pending=0, live_workers=4)) == 1
