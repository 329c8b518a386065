"""Workers as Ray actors on a real local multi-node Ray cluster (ray.cluster_utils.Cluster,
one CPU per node so that two actors must land on two nodes): requests served from more than
one node; a node removed under load loses nothing; the pool grows under a backlog and
shrinks after it."""

from __future__ import annotations

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
from ppml_serve.cluster.ray_pool import PoolSpec, RayWorkerPool, queue_stats_source
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
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


def test_pool_grows_under_a_backlog_and_shrinks_after(ray_stack: RayStack) -> None:
    ray_stack.cluster.add_node(num_cpus=1)
    pool = ray_stack.pool(min_replicas=1, max_replicas=2, target_lag=4,
                          scale_up_cooldown_s=0, scale_down_cooldown_s=2)
    pool.scale_to(1)
    assert _wait(lambda: ray_stack.live_workers() >= 1)
    heavy = np.tile(IMAGES[:64], (16, 1, 1))  # 1,024 rows: a job takes the engine a while
    with ray_stack.client() as client:
        jobs = [client.submit("demo", heavy) for _ in range(150)]
        grew = _wait(lambda: pool.step() == 2, timeout_s=30)
        answers = [client.result("demo", job, wait_s=60) for job in jobs]
    assert grew, "the pool did not grow under a backlog"
    assert all(answer is not None for answer in answers)
    assert _wait(lambda: pool.step() == 1, timeout_s=30), "the pool did not shrink"
    pool.scale_to(0)
