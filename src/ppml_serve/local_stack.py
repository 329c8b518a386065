"""Run a whole service on this machine as child processes: managed Redis, workers, gateway.

Used by ``ppml-serve up`` and by the benchmark. Passwords travel in 0600 files, never on
command lines; children get the effective settings as a YAML file without secrets.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppml_serve.client import Client
from ppml_serve.crypto.kms.local import write_private
from ppml_serve.errors import NotReady
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.settings import Settings
from ppml_serve.state import prepare_state

log = logging.getLogger("ppml_serve.stack")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = field(default=0)

    def start(self, env: dict[str, str]) -> None:
        # A new session: Ctrl-C reaches only the supervisor, which stops children in order.
        self.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def terminate(self) -> None:
        if self.alive() and self.process is not None:
            self.process.terminate()

    def wait(self, timeout_s: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_run_config(settings: Settings, path: Path) -> None:
    """The effective settings for the children, without secrets (they read files)."""
    document = settings.model_dump(mode="json", exclude={"redis": {"url"}})
    write_private(path, yaml.safe_dump(document).encode())


class LocalStack:
    """Managed Redis + ``workers`` worker processes per model + one gateway."""

    def __init__(self, settings: Settings, workers: int = 1, log_level: str = "INFO") -> None:
        self.settings = settings
        self.workers = workers
        self.log_level = log_level
        if settings.gateway.port == 0:
            settings.gateway.port = free_port()
        scheme = "http" if settings.gateway.plaintext_http else "https"
        self.url = f"{scheme}://{settings.gateway.host}:{settings.gateway.port}"
        self.redis = ManagedRedis(
            settings.state_dir / "redis", port=free_port(), cert_file=settings.server_cert_file,
            key_file=settings.server_key_file, ca_file=settings.ca_file,
            prefix=settings.redis.prefix, tls=not settings.redis.allow_plaintext)
        self.children: list[Child] = []
        self.gateway: Child | None = None

    def start(self, ready_timeout_s: float = 60) -> None:
        settings = self.settings
        state = settings.state_dir
        prepare_state(settings)
        self.redis.start()
        write_private(settings.redis_url_file, self.redis.url.get_secret_value().encode() + b"\n")
        write_private(state / "redis-admin.url",
                      self.redis.admin_url.get_secret_value().encode() + b"\n")
        run_config = state / "run-config.yaml"
        write_run_config(settings, run_config)
        self._env = dict(os.environ, PPML_SUPERVISOR_PID=str(os.getpid()))
        self._env.pop("PPML_REDIS__URL", None)
        base = [sys.executable, "-m", "ppml_serve"]
        common = ["--config", str(run_config), "--log-level", self.log_level]
        self.children = [
            Child(f"worker {name} #{index}",
                  [*base, "worker", *common, "--model", f"{name}={path}"])
            for name, path in settings.models.items() for index in range(self.workers)
        ]
        self.gateway = Child("gateway", [*base, "gateway", *common])
        self.children.append(self.gateway)
        for child in self.children:
            child.start(self._env)
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.url, ca_file=self.settings.ca_file, timeout_s=2) as client:
            while time.monotonic() < deadline:
                for child in self.children:
                    if not child.alive():
                        raise NotReady(f"{child.name} exited during start-up "
                                       f"(code {child.returncode})")
                try:
                    if client.ready():
                        return
                except Exception as exc:  # httpx wraps refused connections in its own errors
                    log.debug("gateway not answering yet (%s)", type(exc).__name__)
                time.sleep(0.2)
        raise NotReady(f"the service did not become ready within {timeout_s:g} s")

    def supervise(self) -> None:
        """Restart a crashed worker (up to 5 times); a dead gateway or Redis is fatal."""
        if self.redis.process is not None and self.redis.process.poll() is not None:
            raise NotReady("redis-server exited")
        for child in self.children:
            if child.alive():
                continue
            if child is self.gateway or child.restarts >= 5:
                raise NotReady(f"{child.name} exited with code {child.returncode}")
            child.restarts += 1
            log.warning("%s exited; restarting it (%d)", child.name, child.restarts)
            child.start(self._env)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait(10)
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(10)
        self.redis.stop()
