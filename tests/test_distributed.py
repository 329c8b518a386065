"""No hidden shared disk: Redis, key broker, gateway and two workers as separate processes,
each with its own state directory and its own address (127.0.0.2-4, with certificates for
those addresses), sharing only what an operator would hand out: one config file, the CA
certificate and each part's own credentials. If any part read another's files, it would fail
here, as it would on separate machines."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from ppml_serve.client import Client
from ppml_serve.crypto.attestation.simulated import PRIVATE_FILE, PUBLIC_FILE
from ppml_serve.crypto.tls import issue_server_cert
from ppml_serve.engines import load_engine
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.queue.redis_server import free_port
from ppml_serve.settings import load_settings
from ppml_serve.worker.runner import release_entry

REDIS, BROKER, GATEWAY = "127.0.0.2", "127.0.0.3", "127.0.0.4"
RUN = [sys.executable, "-m", "ppml_serve"]


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


class Parts:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([*RUN, *argv, "--log-level", "WARNING"],
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def parts() -> Iterator[Parts]:
    running = Parts()
    try:
        yield running
    finally:
        running.stop()


def _wait_for(condition: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def test_parts_on_separate_state_dirs_and_addresses(tmp_path: Path, parts: Parts) -> None:
    operator, machines = tmp_path / "operator", tmp_path / "machines"
    subprocess.run([*RUN, "init", "--state-dir", str(operator)], check=True,
                   capture_output=True, timeout=60,
                   env={**os.environ, "PPML_SECURITY__ATTESTATION": "simulated"})
    ports = {"redis": free_port(), "broker": free_port(), "gateway": free_port()}
    config = tmp_path / "ppml.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"demo": str(demo_model_path())},
        "gateway": {"host": GATEWAY, "port": ports["gateway"]},
        "keybroker": {"host": BROKER, "port": ports["broker"]},
        # simulated attestation: its platform key is the one file each worker host holds
        "security": {"keybroker_url": f"https://{BROKER}:{ports['broker']}",
                     "attestation": "simulated"},
        "worker": {"heartbeat_s": 0.3, "claim_idle_ms": 1500, "engine_threads": 1},
    }))
    common = ["--config", str(config)]

    # Redis: a certificate for its address; it hands back the service URL (a credential).
    redis_dir = machines / "redis"
    issue_server_cert(operator, redis_dir, "redis", [REDIS])
    parts.start("redis", "--state-dir", str(redis_dir), "--host", REDIS,
                "--port", str(ports["redis"]), *common)
    _wait_for((redis_dir / "redis.url").exists, "redis start")
    redis_url = redis_dir / "redis.url"

    # Key broker: the KMS, the attestation verifier's public key and the policy.
    broker_dir = machines / "keybroker"
    issue_server_cert(operator, broker_dir, "keybroker", [BROKER])
    _copy(operator / "kms", broker_dir / "kms")
    _copy(operator / "kms-passphrase", broker_dir / "kms-passphrase")
    _copy(operator / "attestation" / PUBLIC_FILE, broker_dir / "attestation" / PUBLIC_FILE)
    settings = load_settings(config)
    (broker_dir / "policy.yaml").write_text(yaml.safe_dump({
        "allowed_providers": ["simulated"], "allow_debug": True,
        "releases": [release_entry(settings, "demo", demo_model_path())]}))
    parts.start("keybroker", "--state-dir", str(broker_dir), *common)

    # Gateway: API keys, the record keys' KMS, its certificate, the Redis URL.
    gateway_dir = machines / "gateway"
    issue_server_cert(operator, gateway_dir, "gateway", [GATEWAY])
    for name in ("api-keys.json", "kms", "kms-passphrase"):
        _copy(operator / name, gateway_dir / name)
    _copy(redis_url, gateway_dir / "redis.url")
    parts.start("gateway", "--state-dir", str(gateway_dir), *common)

    # Workers: the CA, the Redis URL and their (simulated) platform's attestation key.
    for index in (1, 2):
        worker_dir = machines / f"worker{index}"
        _copy(operator / "ca.pem", worker_dir / "ca.pem")
        _copy(redis_url, worker_dir / "redis.url")
        _copy(operator / "attestation" / PRIVATE_FILE, worker_dir / "attestation" / PRIVATE_FILE)
        parts.start("worker", "--state-dir", str(worker_dir), "--model",
                    f"demo={demo_model_path()}", *common)

    images, _ = demo_samples()
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": images[:16]})["probabilities"].argmax(axis=1)
    api_key = (operator / "api-key").read_text().strip()
    url = f"https://{GATEWAY}:{ports['gateway']}"

    def both_workers_live() -> bool:
        try:
            metrics = httpx.get(f"{url}/metrics", verify=str(operator / "ca.pem"),
                                headers={"Authorization": f"Bearer {api_key}"}, timeout=5)
        except httpx.HTTPError:
            return False
        return 'ppml_live_workers{model="demo",version="1"} 2.0' in metrics.text

    _wait_for(both_workers_live, "two workers serving through the gateway")
    with Client(url, api_key=api_key, ca_file=operator / "ca.pem", timeout_s=10) as client:
        predicted = client.infer("demo", images[:16])["probabilities"].argmax(axis=1)
    assert (predicted == expected).all()
    assert all(process.poll() is None for process in parts.processes), "a part exited"
    # Nothing was written outside each part's own directory.
    for part in machines.iterdir():
        for path in part.rglob("*"):
            assert path.resolve().is_relative_to(part.resolve()), path
    assert not (machines / "gateway" / "attestation").exists()
    assert not (machines / "worker1" / "kms").exists()
    assert not (machines / "worker1" / "api-keys.json").exists()
