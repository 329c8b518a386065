"""Gateways and workers on a real Redis Cluster: three TLS nodes with ACL users, started and
joined by the test; two models, each model's keys in one hash slot."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import yaml

from ppml_serve.client import Client
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import write_dev_policy
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.queue.redis_common import live_workers_sync
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.settings import load_settings
from ppml_serve.state import prepare_state

RUN = [sys.executable, "-m", "ppml_serve"]
MODELS = ("demo", "digits")


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below Linux's ephemeral
    range (32768 up): a port from that range can be handed to some outgoing connection between
    this check and redis-server's bind (seen once in CI: "Address already in use")."""
    while True:
        port = random.randrange(10_000, 22_700)
        try:
            with socket.socket() as probe, socket.socket() as bus:
                probe.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def _formed(info: object) -> bool:
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO into a dict
        return info.get("cluster_state") == "ok"
    return isinstance(info, bytes | str) and "cluster_state:ok" in str(info)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(state directory, config file, admin URL of one node) of a formed 3-node cluster."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is needed (Debian package redis-tools, with redis-server)")
    state = tmp_path_factory.mktemp("cluster")
    config = state / "ppml.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state), "redis": {"cluster": True},
        "models": {name: str(demo_model_path()) for name in MODELS},
        "gateway": {"port": free_port(), "request_timeout_s": 20},
        # a development stack's quotes come from its TEST PKI: its broker names that root
        "keybroker": {"port": free_port(),
                      "dcap_test_root_file": str(state / "attestation" / "test-pki-root.der")},
        "worker": {"heartbeat_s": 0.3, "claim_idle_ms": 1500, "engine_threads": 1},
    }))
    settings = load_settings(config)
    prepare_state(settings)
    passwords = ("service-" + os.urandom(16).hex(), "admin-" + os.urandom(16).hex())
    nodes = [ManagedRedis(state / f"redis-{index}", _cluster_port(), settings.server_cert_file,
                          settings.server_key_file, settings.ca_file, cluster=True,
                          passwords=passwords) for index in range(3)]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--tls", "--cacert", str(settings.ca_file), "--user", "admin",
             "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            env=dict(os.environ, REDISCLI_AUTH=passwords[1]), check=True,
            capture_output=True, timeout=60)
        admin = redis.Redis.from_url(nodes[0].admin_url.get_secret_value(),
                                     ssl_ca_certs=str(settings.ca_file))
        deadline = time.monotonic() + 30
        while not _formed(admin.cluster("INFO")):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.2)
        (state / "redis.url").write_text(nodes[0].url.get_secret_value() + "\n")
        os.chmod(state / "redis.url", 0o600)
        write_dev_policy(settings, settings.policy_file)
        (state / "keybroker.url").write_text(f"https://127.0.0.1:{settings.keybroker.port}\n")
        yield state, config, nodes[0].admin_url.get_secret_value()
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def served(cluster: tuple[Path, Path, str]) -> Iterator[tuple[Path, Path, str]]:
    _, config, _ = cluster
    common = ["--config", str(config), "--log-level", "WARNING"]
    argv = [[*RUN, "keybroker", *common], [*RUN, "gateway", *common]]
    argv += [[*RUN, "worker", *common, "--model", f"{name}={demo_model_path()}"]
             for name in MODELS for _ in range(2)]
    processes = [subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
                 for args in argv]
    try:
        settings = load_settings(config)
        deadline = time.monotonic() + 60
        while not all(live_workers_sync(settings.redis_url(), settings.ca_file, "ppml", name,
                                        2.0, cluster=True) == 2 for name in MODELS):
            assert time.monotonic() < deadline, "workers did not join the cluster's queues"
            assert all(p.poll() is None for p in processes), "a part exited"
            time.sleep(0.3)
        yield cluster
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def test_models_served_through_a_redis_cluster(served: tuple[Path, Path, str]) -> None:
    state, config, admin_url = served
    settings = load_settings(config)
    images, _ = demo_samples()
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": images[:8]})["probabilities"].argmax(axis=1)
    with Client(f"https://127.0.0.1:{settings.gateway.port}",
                api_key=(state / "api-key").read_text().strip(),
                ca_file=settings.ca_file) as client:
        for name in MODELS:
            predicted = client.infer(name, images[:8])["probabilities"].argmax(axis=1)
            assert np.array_equal(predicted, expected), name
        job = client.submit("digits", images[:2])
        assert client.result("digits", job, wait_s=10) is not None
    # the front answers them itself (once its routes are installed, within ~0.1 s of the
    # workers' arrival), with its queue client on the cluster: keys routed to their nodes
    def natively_answered() -> float:
        text = httpx.get(f"https://127.0.0.1:{settings.gateway.port}/metrics",
                         verify=str(settings.ca_file), headers={"Authorization": f"Bearer {key}"}
                         ).text
        found = re.search(r"\nppml_front_native_answers_total (\S+)", text)
        assert found, "no native front counter"
        return float(found.group(1))

    key = (state / "api-key").read_text().strip()
    with Client(f"https://127.0.0.1:{settings.gateway.port}", api_key=key,
                ca_file=settings.ca_file) as client:
        for name in MODELS:
            deadline = time.monotonic() + 5
            while True:
                before = natively_answered()
                predicted = client.infer(name, images[:8])["probabilities"].argmax(axis=1)
                assert np.array_equal(predicted, expected), name
                if natively_answered() == before + 1:
                    break
                assert time.monotonic() < deadline, f"{name} never took the native path"
                time.sleep(0.1)
    nodes = redis.RedisCluster.from_url(admin_url, ssl_ca_certs=str(settings.ca_file))
    try:
        for name in MODELS:
            keys = [key.decode() for key in
                    nodes.scan_iter(match=f"ppml:{{{name}}}:*", target_nodes="all")]
            assert any(key.endswith(":req") for key in keys), keys
            slots = {nodes.keyslot(key) for key in keys}
            assert len(slots) == 1, f"model {name}'s keys span slots {slots}"
    finally:
        nodes.close()
