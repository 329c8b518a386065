"""``ppml-serve up``: managed Redis, workers and gateway as child processes, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppml_serve.cli.state import prepare_state, read_api_key
from ppml_serve.client import Client, ClientError
from ppml_serve.crypto.kms.local import write_private
from ppml_serve.errors import NotReady
from ppml_serve.models import DEMO_NAME, demo_samples
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.settings import Settings

log = logging.getLogger("ppml_serve.up")


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


def wait_ready(url: str, ca_file: Path, children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(url, ca_file=ca_file, timeout_s=2) as client:
        while time.monotonic() < deadline:
            for child in children:
                if not child.alive():
                    raise NotReady(f"{child.name} exited during start-up")
            try:
                if client.ready():
                    return
            except OSError:
                log.debug("gateway not answering yet")
            except Exception as exc:  # httpx wraps connection refusals in its own errors
                log.debug("gateway not answering yet (%s)", type(exc).__name__)
            time.sleep(0.2)
    raise NotReady(f"the service did not become ready within {timeout_s:g} s")


def self_check(url: str, settings: Settings) -> str:
    images, labels = demo_samples()
    with Client(url, api_key=read_api_key(settings.state_dir), ca_file=settings.ca_file) as client:
        probabilities = client.infer(DEMO_NAME, images[:8])["probabilities"]
    predicted = probabilities.argmax(axis=1)
    correct = int((predicted == labels[:8]).sum())
    return (f"self-check: model 'demo' classified 8 held-out digits {predicted.tolist()}, "
            f"{correct}/8 correct")


def run_up(settings: Settings, workers: int, config_file: Path | None) -> int:
    prepare_state(settings)
    state = settings.state_dir
    if settings.gateway.port == 0:
        settings.gateway.port = free_port()
    redis = ManagedRedis(state / "redis", port=free_port(), cert_file=settings.server_cert_file,
                         key_file=settings.server_key_file, ca_file=settings.ca_file,
                         prefix=settings.redis.prefix)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    redis.start()
    write_private(settings.redis_url_file, redis.url.get_secret_value().encode() + b"\n")
    write_private(state / "redis-admin.url", redis.admin_url.get_secret_value().encode() + b"\n")
    run_config = state / "run-config.yaml"
    write_run_config(settings, run_config)
    env = dict(os.environ, PPML_SUPERVISOR_PID=str(os.getpid()))
    env.pop("PPML_REDIS__URL", None)
    base = [sys.executable, "-m", "ppml_serve"]
    children = [
        Child(f"worker {name} #{index}",
              [*base, "worker", "--config", str(run_config), "--model", f"{name}={path}"])
        for name, path in settings.models.items() for index in range(workers)
    ]
    gateway = Child("gateway", [*base, "gateway", "--config", str(run_config)])
    children.append(gateway)
    scheme = "http" if settings.gateway.plaintext_http else "https"
    url = f"{scheme}://{settings.gateway.host}:{settings.gateway.port}"
    code = 0
    try:
        for child in children:
            child.start(env)
        wait_ready(url, settings.ca_file, children, timeout_s=60)
        print(f"ready {url}", flush=True)
        print(f"example: curl --cacert {settings.ca_file} -H \"Authorization: Bearer "
              f"$(cat {state / 'api-key'})\" {url}/v2/models/{DEMO_NAME}", flush=True)
        if DEMO_NAME in settings.models:
            print(self_check(url, settings), flush=True)
        while not stop.is_set():
            for child in children:
                if child.alive():
                    continue
                if child is gateway or child.restarts >= 5:
                    raise NotReady(f"{child.name} exited with code "
                                   f"{child.process.returncode if child.process else '?'}")
                child.restarts += 1
                log.warning("%s exited; restarting it (%d)", child.name, child.restarts)
                child.start(env)
            stop.wait(0.5)
    except (NotReady, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping", flush=True)
        gateway.terminate()
        gateway.wait(10)
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        redis.stop()
        print("stopped", flush=True)
    return code


def exit_when_orphaned() -> None:
    """Children of ``up`` stop if the supervisor disappears (e.g. SIGKILL)."""
    supervisor = os.environ.get("PPML_SUPERVISOR_PID")
    if not supervisor:
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


