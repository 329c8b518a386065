"""A real stack for end-to-end tests: TLS redis-server, key broker, workers and gateway."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ppml_serve.crypto.envelope import Keyring
from ppml_serve.crypto.keys import data_key_table, open_kms
from ppml_serve.local_stack import Child, LocalStack
from ppml_serve.models import demo_model_path
from ppml_serve.settings import Settings, load_settings
from ppml_serve.state import read_api_key

MAX_REQUEST_BYTES = 1 << 20


def stack_settings(state: Path, **extra: object) -> Settings:
    options: dict[str, object] = {
        "state_dir": state,
        "models": {"demo": demo_model_path()},
        "gateway": {"port": 0, "max_request_bytes": MAX_REQUEST_BYTES, "request_timeout_s": 20},
        "worker": {"claim_idle_ms": 1500, "heartbeat_s": 0.3, "max_batch_delay_ms": 5,
                   "max_deliveries": 3, "engine_threads": 1},
    }
    options.update(extra)
    return load_settings(**options)


@dataclass
class Stack:
    local: LocalStack

    @property
    def settings(self) -> Settings:
        return self.local.settings

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def api_key(self) -> str:
        return read_api_key(self.settings.state_dir)

    @property
    def ca_file(self) -> Path:
        return self.settings.ca_file

    @property
    def workers(self) -> list[Child]:
        return [c for c in self.local.children if c.name.startswith("worker")]

    def keyring(self, model: str = "demo") -> Keyring:
        """The keys a worker attested for ``model`` receives (its derivations only)."""
        return data_key_table(self.settings).keyring(open_kms(self.settings)).for_model(model)

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.local.redis.admin_url.get_secret_value(),
                                    ssl_ca_certs=str(self.ca_file), ssl_cert_reqs="required")

    def http(self, api_key: str | None = "default") -> httpx.Client:
        headers = {}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key if api_key == 'default' else api_key}"
        return httpx.Client(base_url=self.url, verify=str(self.ca_file), headers=headers,
                            timeout=30)

    def native_answers(self) -> int:
        """``ppml_front_native_answers_total``: requests the native front answered itself."""
        with self.http() as http:
            text = http.get("/metrics").text
        found = next((line for line in text.splitlines()
                      if line.startswith("ppml_front_native_answers_total ")), None)
        assert found, "the front's counter is missing from /metrics"
        return int(float(found.split()[1]))

    def replace_worker(self, victim: Child) -> None:
        """Start a new worker with the victim's command line, in its place."""
        replacement = self.local.child(victim.name, victim.argv)
        replacement.start(self.local._env)
        self.local.children[self.local.children.index(victim)] = replacement


class RedisCommands:
    """Every command Redis receives (MONITOR), until the first reply is posted."""

    def __init__(self, admin: redis.Redis) -> None:
        self.commands: list[str] = []
        self._admin = admin
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        with self._admin.monitor() as monitor:
            self._started.set()
            for command in monitor.listen():
                self.commands.append(command["command"])
                if ":reply:" in command["command"] and "XADD" in command["command"].upper():
                    return

    def __enter__(self) -> RedisCommands:
        self._thread.start()
        self._started.wait(5)
        time.sleep(0.2)  # MONITOR is registered once its first read is under way
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(10)

    @property
    def text(self) -> str:
        return "\n".join(self.commands)


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_stack(settings: Settings, workers: int = 1, log_level: str = "WARNING",
                  **options: Any) -> Iterator[LocalStack]:
    """A started local stack, stopped (every process with it) on the way out."""
    local = LocalStack(settings, workers=workers, log_level=log_level, **options)
    try:
        local.start()
        yield local
    finally:
        local.stop()


@contextlib.contextmanager
def supervised_stack(settings: Settings, workers: int = 2) -> Iterator[LocalStack]:
    """A started stack with ``up``'s supervision loop in a thread (dead parts restarted);
    on the way out, every process of it is checked to be gone."""
    from ppml_serve.bench.faults import Supervisor

    local = LocalStack(settings, workers=workers, log_level="WARNING")
    try:
        local.start()
        with Supervisor(local) as supervisor:
            yield local
        assert supervisor.error is None, f"the supervisor gave up: {supervisor.error}"
    finally:
        local.stop()
    for child in local.children:
        assert not child.alive(), f"{child.name} left running"
    assert not local.redis.alive(), "redis-server left running"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = stack_settings(tmp_path_factory.mktemp("state"))
    local = LocalStack(settings, workers=2, log_level="WARNING")
    try:
        local.start()
        yield Stack(local)
    finally:
        local.stop()


def gateway_rss_mb(stack: LocalStack) -> float:
    """Resident memory of a stack's gateway process."""
    assert stack.gateway is not None and stack.gateway.process is not None
    for line in Path(f"/proc/{stack.gateway.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
