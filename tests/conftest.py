"""A real stack for end-to-end tests: TLS redis-server, worker and gateway processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from ppml_serve.crypto.kms.local import write_private
from ppml_serve.models import demo_model_path
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.settings import Settings, load_settings
from ppml_serve.state import prepare_state, read_api_key

MAX_REQUEST_BYTES = 1 << 20


@dataclass
class Stack:
    settings: Settings
    config_file: Path
    redis: ManagedRedis
    url: str
    api_key: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        return self.settings.ca_file

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.admin_url.get_secret_value(),
                                    ssl_ca_certs=str(self.ca_file), ssl_cert_reqs="required")

    def http(self, api_key: str | None = "default") -> httpx.Client:
        headers = {}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key if api_key == 'default' else api_key}"
        return httpx.Client(base_url=self.url, verify=str(self.ca_file), headers=headers,
                            timeout=30)

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "ppml_serve", "worker", "--config", str(self.config_file),
             "--model", f"demo={demo_model_path()}", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL,
        )
        self.workers.append(process)
        return process

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self.http() as client:
                    if client.get("/v2/health/ready").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("stack did not become ready")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("state")
    settings = load_settings(
        state_dir=state,
        models={"demo": demo_model_path()},
        gateway={"port": free_port(), "max_request_bytes": MAX_REQUEST_BYTES,
                 "request_timeout_s": 20},
        worker={"claim_idle_ms": 1500, "heartbeat_s": 0.3, "max_batch_delay_ms": 5,
                "max_deliveries": 3, "engine_threads": 1},
    )
    prepare_state(settings)
    managed = ManagedRedis(state / "redis", free_port(), settings.server_cert_file,
                           settings.server_key_file, settings.ca_file)
    managed.start()
    write_private(settings.redis_url_file, managed.url.get_secret_value().encode())
    config_file = state / "test-config.yaml"
    config_file.write_text(yaml.safe_dump(settings.model_dump(mode="json",
                                                              exclude={"redis": {"url"}})))
    result = Stack(settings, config_file, managed, f"https://127.0.0.1:{settings.gateway.port}",
                   read_api_key(state))
    try:
        result.start_worker()
        result.start_worker()
        result.gateway = subprocess.Popen(
            [sys.executable, "-m", "ppml_serve", "gateway", "--config", str(config_file),
             "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, env=dict(os.environ),
        )
        result.wait_ready()
        yield result
    finally:
        stop(result.gateway)
        for worker in result.workers:
            stop(worker)
        managed.stop()
