"""Run a whole service on this machine as child processes: managed Redis, workers, gateway.

Used by ``ppml-serve up`` and by the benchmark. Passwords travel in 0600 files, never on
command lines; children get the effective settings as a YAML file without secrets.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import yaml

from ppml_serve.backoff import Backoff
from ppml_serve.client import Client
from ppml_serve.crypto.attestation.test_pki import ROOT_FILE as TEST_ROOT_FILE
from ppml_serve.crypto.tls import issue_client_cert
from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.log_relay import DroppingOutput, LogFollower
from ppml_serve.private_files import secure_directory, write_private
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.repository import Repository
from ppml_serve.settings import Settings
from ppml_serve.state import prepare_state, read_api_key
from ppml_serve.worker.runner import release_entry, repository_releases

log = logging.getLogger("ppml_serve.stack")


def open_log(path: Path) -> int:
    """A part's log file for appending: owner-only, never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)


@dataclass
class Child:
    """A child process that logs to its own rotating file (``log_file``), so that no reader
    of ``up``'s output can ever hold it up; ``follower`` copies its lines to ``up``'s stderr
    and keeps the last ones (crash report)."""

    name: str
    argv: list[str]
    log_file: Path
    follower: LogFollower
    process: subprocess.Popen[bytes] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20), repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.follower.follow(self.log_file, self.tail.append)
        fd = open_log(self.log_file)
        try:
            # A new session: Ctrl-C reaches only the supervisor, which stops children in order.
            self.process = subprocess.Popen(
                self.argv, env=dict(env, PPML_LOG__FILE=str(self.log_file)),
                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
        finally:
            os.close(fd)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def last_log_lines(self) -> list[str]:
        return list(self.tail)

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


class RestartBudget:
    """A token bucket of restarts: ``capacity`` at once, one more back every ``refill_s``.
    Occasional crashes over a long life never exhaust it; a crash loop does."""

    def __init__(self, capacity: int = 5, refill_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.refill_s = refill_s
        self._clock = clock
        self._tokens = float(capacity)
        self._updated = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) / self.refill_s)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


STABLE_AFTER_S = 30.0
"""A part that has run this long since its restart starts again from the shortest backoff."""


@dataclass
class Supervised:
    """One part of the stack under supervision: how to check, start and describe it."""

    name: str
    alive: Callable[[], bool]
    start: Callable[[], None]
    returncode: Callable[[], int | None]
    last_log_lines: Callable[[], list[str]]
    budget: RestartBudget = field(default_factory=RestartBudget)
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0))
    restart_due: float | None = None
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0

    def check(self, now: float) -> None:
        """Restart the part if it died (after its backoff); raise on a crash loop."""
        if self.restart_due is None and self.alive():
            if now - self.started > STABLE_AFTER_S:
                self.backoff.reset()
            return
        if self.restart_due is None:
            if not self.budget.take():
                lines = "\n  ".join(self.last_log_lines()[-10:]) or "(no output)"
                raise NotReady(f"{self.name} keeps crashing (exit code {self.returncode()}, "
                               f"{self.restarts} restarts); giving up. Its last log lines:\n"
                               f"  {lines}")
            delay = self.backoff.next_delay()
            log.warning("%s exited (code %s); restarting it in %.1f s", self.name,
                        self.returncode(), delay)
            self.restart_due = now + delay
            return
        if now >= self.restart_due:
            self.restart_due = None
            self.started = now
            self.restarts += 1
            try:
                self.start()
            except NotReady as exc:  # counted as another death at the next check
                log.warning("%s failed to restart: %s", self.name, exc)


DEV_POLICY_HEADER = """\
# DEVELOPMENT key-release policy, generated by ppml-serve for this state directory.
# It accepts DCAP quotes from this state directory's TEST PKI (allow_test_root) or SIMULATED
# attestation: NO hardware protection. Production: list the measurements of your TEE builds,
# and leave out allow_test_root and 'simulated'.
"""


def write_dev_policy(settings: Settings, path: Path) -> None:
    """Each served model's measurement, bound to that model (and its wrapped file key); with
    a repository, every version present in it."""
    releases = [release_entry(settings, name, model) for name, model in settings.models.items()]
    if settings.model_repository is not None:
        releases += repository_releases(settings, Repository(settings.model_repository))
    test_pki = settings.security.attestation == "dcap-test"
    document = {"allowed_providers": ["dcap"] if test_pki else ["simulated"],
                "allow_debug": not test_pki, "allow_test_root": test_pki,
                "max_evidence_age_s": 60, "releases": releases}
    write_private(path, (DEV_POLICY_HEADER + yaml.safe_dump(document, sort_keys=False)).encode())


def write_run_config(settings: Settings, path: Path) -> None:
    """The effective settings for the children, without secrets (they read files)."""
    document = settings.model_dump(mode="json", exclude={"redis": {"url"}})
    write_private(path, yaml.safe_dump(document).encode())


def _supervised_child(child: Child, env: dict[str, str]) -> Supervised:
    return Supervised(child.name, child.alive, partial(child.start, env),
                      lambda: child.returncode, child.last_log_lines)


def hold_state_lock(state: Path) -> int:
    """One stack per state directory at a time: an exclusive lock on ``STATE/up.lock``, held
    until the returned descriptor is closed (or the process dies, ``kill -9`` included)."""
    secure_directory(state)
    fd = os.open(state / "up.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"another ppml-serve (pid {holder}) is running on the state directory "
                          f"{state}; stop it first, or use another --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holds_any(pid: int, sockets: set[str]) -> bool:
    """Whether process ``pid`` has one of these sockets open (``socket:[inode]`` names)."""
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in sockets:
                return True
    return False


class LocalStack:
    """Managed Redis + ``workers`` worker processes per model + one gateway."""

    def __init__(self, settings: Settings, workers: int = 1, log_level: str = "INFO",
                 unserved: frozenset[str] = frozenset(),
                 worker_metrics_port: int | None = None,
                 output: DroppingOutput | None = None) -> None:
        self.settings = settings
        self.log_dir = settings.state_dir / "logs"
        """Each part's rotating log file, ``PART.log``."""
        self.follower = LogFollower(output)
        """Copies the parts' log lines to ``output`` (never waited for; None: files only)."""
        self.workers = workers
        self.unserved = unserved
        """Models the gateway knows but no worker is started for (tests of refusal)."""
        self.worker_metrics_port = worker_metrics_port
        """First port of the workers' metrics endpoints (one port per worker), if any."""
        self.worker_metrics: list[str] = []
        """Addresses of the workers' metrics endpoints."""
        self.log_level = log_level
        if settings.gateway.grpc_port is None:  # gRPC beside HTTPS: the next port up
            settings.gateway.grpc_port = (settings.gateway.port + 1 if settings.gateway.port
                                          else free_port())
        if settings.gateway.port == 0:
            settings.gateway.port = free_port()
        scheme = "http" if settings.gateway.plaintext_http else "https"
        self.url = f"{scheme}://{settings.gateway.host}:{settings.gateway.port}"
        self.grpc_address = f"{settings.gateway.host}:{settings.gateway.grpc_port}"
        """host:port of the KServe v2 gRPC service (TLS unless plaintext_http)."""
        self.redis = ManagedRedis(
            settings.state_dir / "redis", port=settings.redis.managed_port or free_port(),
            cert_file=settings.server_cert_file,
            key_file=settings.server_key_file, ca_file=settings.ca_file,
            prefix=settings.redis.prefix, tls=not settings.redis.allow_plaintext,
            persistence=settings.redis.persistence, max_memory_mb=settings.redis.max_memory_mb,
            aof_rewrite_min_mb=settings.redis.aof_rewrite_min_mb,
            unix_socket=settings.redis.local_socket and not settings.redis.allow_plaintext)
        self.children: list[Child] = []
        self._supervised: list[Supervised] = []
        self.gateway: Child | None = None
        """The first gateway process (``gateways`` holds all of them)."""
        self.gateways: list[Child] = []
        self.keybroker: Child | None = None
        self.client_cert: tuple[Path, Path] | None = None
        """A dev client certificate when the gateway requires mutual TLS."""
        self._lock: int | None = None

    def _check_port(self) -> None:
        gateway = self.settings.gateway
        for setting, flag, port in (("gateway.port", "--port", gateway.port),
                                    ("gateway.grpc_port", "--grpc-port", gateway.grpc_port)):
            with socket.socket() as probe:
                # As the listeners bind: a crashed run's connections in TIME_WAIT must not
                # keep the port from being used again for a minute.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((gateway.host, port or 0))
                except OSError as exc:
                    raise ConfigError(f"{setting}: cannot listen on {gateway.host}:{port} "
                                      f"({exc.strerror}); pick another with {flag}") from None

    def start(self, ready_timeout_s: float = 60) -> None:
        settings = self.settings
        state = settings.state_dir
        self._check_port()
        self._lock = hold_state_lock(state)
        prepare_state(settings)
        if settings.gateway.client_ca_file is not None:
            cert, key = state / "client.pem", state / "client-key.pem"
            if not cert.exists():
                issue_client_cert(state, "client")
            self.client_cert = (cert, key)
        self.redis.start()
        # Parts on this host use the Unix socket when there is one (see redis.local_socket).
        url = self.redis.socket_url or self.redis.url
        if settings.redis.payload_spool is None:
            # every part on this host, beside the 0700 state directory: large payloads skip Redis
            settings.redis.payload_spool = state / "spool"
        write_private(settings.redis_url_file, url.get_secret_value().encode() + b"\n")
        write_private(state / "redis-admin.url",
                      self.redis.admin_url.get_secret_value().encode() + b"\n")
        if settings.security.policy_file is None:
            write_dev_policy(settings, settings.policy_file)
        if settings.security.attestation == "dcap-test" and \
                settings.keybroker.dcap_test_root_file is None:
            # the one place a test root is named: this stack's own key broker
            settings.keybroker.dcap_test_root_file = settings.attestation_dir / TEST_ROOT_FILE
        if "port" not in settings.keybroker.model_fields_set:
            # its default (8444) is the gRPC port beside the default HTTPS one: unless it
            # was set (config, PPML_KEYBROKER__PORT), a free port is picked
            settings.keybroker.port = free_port()
        write_private(state / "keybroker.url",
                      f"https://127.0.0.1:{settings.keybroker.port}\n".encode())
        run_config = state / "run-config.yaml"
        write_run_config(settings, run_config)
        self._env = dict(os.environ, PPML_SUPERVISOR_PID=str(os.getpid()))
        self._env.pop("PPML_REDIS__URL", None)
        base = [sys.executable, "-m", "ppml_serve"]
        common = ["--config", str(run_config), "--log-level", self.log_level]
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        self.keybroker = self.child("key broker", [*base, "keybroker", *common])
        self.keybroker.start(self._env)
        self._wait_keybroker(f"https://127.0.0.1:{settings.keybroker.port}", ready_timeout_s)
        workers: list[Child] = []

        def metrics_flags() -> list[str]:
            """Each worker its own metrics port, the next one up (repository workers too)."""
            if self.worker_metrics_port is None:
                return []
            port = self.worker_metrics_port + len(workers)
            scheme = "https" if settings.worker.metrics_tls else "http"
            self.worker_metrics.append(f"{scheme}://{settings.worker.metrics_host}:{port}/metrics")
            return ["--metrics-port", str(port)]

        for name, path in settings.models.items():
            if name in self.unserved:
                continue
            for index in range(self.workers):
                argv = [*base, "worker", *common, "--model", f"{name}={path}",
                        *metrics_flags()]
                workers.append(self.child(f"worker {name} #{index}", argv))
        if settings.model_repository is not None:
            for index in range(self.workers):
                argv = [*base, "worker", *common, "--model-repository",
                        str(settings.model_repository), *metrics_flags()]
                workers.append(self.child(f"worker repository #{index}", argv))
        self.children = [self.keybroker, *workers]
        argv = [*base, "gateway", *common]
        self.gateways = [self.child("gateway" if index == 0 else f"gateway #{index}", argv)
                         for index in range(settings.gateway.processes)]
        self.gateway = self.gateways[0]
        self.children.extend(self.gateways)
        for child in self.children[1:]:
            child.start(self._env)
        self.wait_ready(ready_timeout_s)

    def child(self, name: str, argv: list[str]) -> Child:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
        return Child(name, argv, self.log_dir / f"{slug}.log", self.follower)

    def _wait_keybroker(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(verify=str(self.settings.ca_file), timeout=2) as http:
            while time.monotonic() < deadline:
                if self.keybroker is not None and not self.keybroker.alive():
                    raise NotReady(f"the key broker exited (code {self.keybroker.returncode})")
                try:
                    if http.get(f"{url}/v1/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    log.debug("key broker not answering yet")
                time.sleep(0.1)
        raise NotReady("the key broker did not start")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        served = [name for name in self.settings.models if name not in self.unserved]
        api_key = read_api_key(self.settings.state_dir)
        with Client(self.url, api_key=api_key, ca_file=self.settings.ca_file, timeout_s=2,
                    client_cert=self.client_cert) as client:
            while time.monotonic() < deadline:
                for child in self.children:
                    if not child.alive():
                        raise NotReady(f"{child.name} exited during start-up "
                                       f"(code {child.returncode})")
                try:
                    if all(client.model_ready(name) for name in served) \
                            and self._repository_settled(client) and self._gateways_listening():
                        return
                except Exception as exc:  # httpx wraps refused connections in its own errors
                    log.debug("gateway not answering yet (%s)", type(exc).__name__)
                time.sleep(0.2)
        raise NotReady(f"the service did not become ready within {timeout_s:g} s")

    def _gateways_listening(self) -> bool:
        """Every gateway process has joined the shared port: one answering is not enough,
        the kernel only spreads connections over those that listen (Linux /proc; elsewhere,
        or with one gateway, nothing to check)."""
        if len(self.gateways) < 2 or not Path("/proc/net/tcp").exists():
            return True
        port = f"{self.settings.gateway.port:04X}"
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()  # local address, …, state (0A: LISTEN), …, inode
                    if fields[1].endswith(f":{port}") and fields[3] == "0A":
                        inodes.add(f"socket:[{fields[9]}]")
        return all(child.process is not None and _holds_any(child.process.pid, inodes)
                   for child in self.gateways)

    def _repository_settled(self, client: Client) -> bool:
        """Every repository model is listed by the workers, and none is still loading."""
        root = self.settings.model_repository
        if root is None:
            return True
        index = client.repository_index()
        listed = {row["name"] for row in index}
        return set(Repository(root).names()) <= listed and \
            not any(row["state"] == "LOADING" for row in index)

    def repository_problems(self) -> list[str]:
        """Repository models or versions that could not be served, with why."""
        if self.settings.model_repository is None:
            return []
        api_key = read_api_key(self.settings.state_dir)
        with Client(self.url, api_key=api_key, ca_file=self.settings.ca_file, timeout_s=5,
                    client_cert=self.client_cert) as client:
            return [f"{row['name']} version {row['version'] or '-'}: {row['reason']}"
                    for row in client.repository_index()
                    if row["state"] == "UNAVAILABLE" and row["reason"] != "not loaded"]

    def _supervision(self) -> list[Supervised]:
        redis = self.redis
        parts = [Supervised("redis-server", redis.alive, redis.start,
                            lambda: redis.process.returncode if redis.process else None,
                            redis.last_log_lines)]
        return parts + [_supervised_child(child, self._env) for child in self.children]

    def supervise(self) -> None:
        """Restart any part that died (Redis, key broker, gateway, workers) with backoff;
        ``NotReady`` only for a crash loop (a part's restart budget is spent)."""
        if not self._supervised:
            self._supervised = self._supervision()
        now = time.monotonic()
        for part in self._supervised:
            part.check(now)

    def stop(self) -> None:
        for gateway in self.gateways:  # first: no new requests while the rest stops
            gateway.terminate()
        for gateway in self.gateways:
            gateway.wait(10)
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(10)
        self.redis.stop()
        self.follower.stop()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None
