"""A managed ``redis-server`` child process: TLS only, ACL users, loopback, data in a folder.

Passwords go into a 0600 config file, never onto the command line.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pydantic import SecretStr

from ppml_serve.crypto.tls import SERVER_CIPHERS
from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.private_files import write_private
from ppml_serve.queue.redis_common import ping_sync

SERVICE_USER = "ppml"

log = logging.getLogger("ppml_serve.stack")


@dataclass
class ManagedRedis:
    """Settings of a managed Redis; ``url`` and ``admin_url`` carry passwords."""

    directory: Path
    port: int
    cert_file: Path
    key_file: Path
    ca_file: Path
    prefix: str = "ppml"
    tls: bool = True
    """Off only to measure what TLS costs (benchmarks)."""
    persistence: str = "aof"
    """``aof``: append-only file, fsync every second; ``none``: memory only."""
    max_memory_mb: int | None = None
    """``maxmemory``; unset: a quarter of this machine's memory."""
    aof_rewrite_min_mb: int = 16
    """The AOF is compacted once it has grown this much (and doubled since the last time)."""
    host: str = "127.0.0.1"
    """Interface to listen on (loopback unless other hosts must reach it)."""
    cluster: bool = False
    """A Redis Cluster node (its bus, on port + 10000, speaks TLS too)."""
    unix_socket: bool = False
    """Also listen on ``DIRECTORY/redis.sock`` (mode 0700, in a 0700 directory), for parts on
    this host; ``socket_url`` then names it."""
    passwords: tuple[str, str] | None = field(default=None, repr=False)
    """Service and admin passwords to use (the nodes of a cluster share their ACL users);
    fresh random ones when unset."""
    url: SecretStr = field(init=False, repr=False)
    admin_url: SecretStr = field(init=False, repr=False)
    socket_url: SecretStr | None = field(default=None, init=False, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _passwords: tuple[str, str] = field(init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        # Fixed for this object's life: a restarted Redis takes back the same clients.
        self._passwords = self.passwords or (secrets.token_urlsafe(32),
                                             secrets.token_urlsafe(32))

    def write_config(self) -> Path:
        """Write redis.conf (0600); return its path."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        service_password, admin_password = self._passwords
        lines = [
            f"bind {self.host}",
            *(
                [
                    "port 0",
                    f"tls-port {self.port}",
                    f"tls-cert-file {self.cert_file.resolve()}",
                    f"tls-key-file {self.key_file.resolve()}",
                    f"tls-ca-cert-file {self.ca_file.resolve()}",
                    "tls-auth-clients no",
                    'tls-protocols "TLSv1.2 TLSv1.3"',
                    # TLS 1.2: forward-secret AEAD suites only (no CBC, no SHA-1 MACs).
                    f'tls-ciphers "{SERVER_CIPHERS}"',
                    "tls-prefer-server-ciphers yes",
                ]
                if self.tls
                else [f"port {self.port}"]
            ),
            *(["cluster-enabled yes", "cluster-config-file nodes.conf",
               *(["tls-cluster yes"] if self.tls else [])] if self.cluster else []),
            *([f"unixsocket {self.socket_path}", "unixsocketperm 700"]
              if self._socket_usable() else []),
            f"dir {self.directory.resolve()}",
            f"pidfile {(self.directory / 'redis.pid').resolve()}",
            # AOF keeps queued requests and job answers across a Redis restart, losing at most
            # the last second of writes; no RDB snapshots (their forks copy every payload).
            *(["appendonly yes", "appendfsync everysec", "auto-aof-rewrite-percentage 100",
               f"auto-aof-rewrite-min-size {self.aof_rewrite_min_mb}mb"]
              if self.persistence == "aof" else ["appendonly no"]),
            f"maxmemory {(self.max_memory_mb or default_max_memory_mb())}mb",
            'save ""',
            "protected-mode yes",
            "loglevel warning",
            f"logfile {(self.directory / 'redis.log').resolve()}",
            "maxmemory-policy noeviction",
            # Not "off": Redis 7.0 replays the AOF's MULTI/EXEC blocks (which Lua effects
            # and transactions become) as the default user, and refuses them when it is off.
            # A random password no one is given closes it just as well.
            f"user default on >{secrets.token_urlsafe(32)} ~* &* +@all",
            # The service user reaches only its own keys and cannot run admin commands.
            f"user {SERVICE_USER} on >{service_password} ~{self.prefix}:* resetchannels "
            "+@all -@dangerous +info",
            f"user admin on >{admin_password} ~* &* +@all",
        ]
        path = self.directory / "redis.conf"
        write_private(path, ("\n".join(lines) + "\n").encode())
        if self._socket_usable():
            self.socket_url = SecretStr(f"unix://{SERVICE_USER}:{quote(service_password)}@"
                                        f"{self.socket_path}?db=0")
        scheme = "rediss" if self.tls else "redis"
        self.url = SecretStr(
            f"{scheme}://{SERVICE_USER}:{quote(service_password)}@{self.host}:{self.port}/0")
        self.admin_url = SecretStr(
            f"{scheme}://admin:{quote(admin_password)}@{self.host}:{self.port}/0")
        return path

    def start(self, timeout_s: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server not found on PATH; install it "
                              "(Debian: apt-get install redis-server)")
        config = self.write_config()
        self.stop_orphan()
        self._log_offset = self.log_size()
        # Own session: a Ctrl-C meant for the supervisor must not stop Redis before the others.
        # umask 077: its AOF, dump and log files are owner-only, like the rest of the state.
        self.process = subprocess.Popen([binary, str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, umask=0o077)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise NotReady(f"redis-server exited with code {self.process.returncode}; "
                               f"see {self.directory / 'redis.log'}")
            try:
                ping_sync(self.url, self.ca_file)  # a node answers before the cluster forms
                return
            except NotReady:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop_orphan(self, timeout_s: float = 10.0) -> int | None:
        """Stop a redis-server that an earlier run left on this directory (its supervisor was
        killed): it holds the AOF and the socket this one needs. Returns its pid, if any.
        Only a process whose working directory is this directory counts (the pid file alone
        could name an unrelated process by now)."""
        pid = _pid_in(self.directory / "redis.pid")
        if pid is None or (self.process is not None and self.process.pid == pid):
            return None
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            command = Path(f"/proc/{pid}/comm").read_text()
        except OSError:
            return None  # gone, or not ours to look at
        if cwd != str(self.directory.resolve()) or "redis" not in command:
            return None
        log.warning("stopping redis-server (pid %d) left running on %s by an earlier run",
                    pid, self.directory)
        os.kill(pid, signal.SIGTERM)  # it writes out its AOF first
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        return pid

    @property
    def socket_path(self) -> Path:
        return (self.directory / "redis.sock").resolve()

    def _socket_usable(self) -> bool:
        # sun_path holds 107 bytes: a deeper state directory keeps TLS on loopback instead.
        return self.unix_socket and len(str(self.socket_path).encode()) < 100

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_size(self) -> int:
        try:
            return (self.directory / "redis.log").stat().st_size
        except OSError:
            return 0

    def last_log_lines(self, count: int = 10) -> list[str]:
        """The end of this run's Redis log (for a crash report)."""
        try:
            with (self.directory / "redis.log").open("rb") as handle:
                handle.seek(self._log_offset)
                text = handle.read()[-8192:].decode("utf-8", "replace")
        except OSError:
            return []
        return text.splitlines()[-count:]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def default_max_memory_mb() -> int:
    """A quarter of this machine's physical memory (at least 64 MiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 1024
    return max(64, total // 4 // (1 << 20))


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
