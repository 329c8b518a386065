"""Large request payloads beside the queue instead of in it, for parts on one host.

When gateway, Redis and workers share a host, a payload that goes through Redis is copied
into Redis, appended to its log, and copied out again: most of Redis's CPU per request.
A spool is a private directory (0700, files 0600) the gateway writes each large payload to
(a sealed record, as it would be in Redis); the stream entry carries only the file's name.
The worker that takes the entry reads the file; whoever acks the entry removes it. Files
outlive any process that dies (a reclaimed entry still finds its payload); what nobody
removed (a crash between ack and removal, an entry lost with Redis) is swept by age.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import uuid
from pathlib import Path

from ppml_serve.errors import ConfigError

_NAME = re.compile(r"[0-9a-f]{32}")


class PayloadSpool:
    """One host's spool directory, shared by its gateways and workers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def configured(cls, directory: Path | None) -> PayloadSpool | None:
        """The spool a part was configured with, ready to use (``None``: no spool)."""
        if directory is None:
            return None
        spool = cls(directory)
        spool.prepare()
        return spool

    def prepare(self) -> None:
        """Create the directory private to this user (or check that it is)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            status = self.directory.lstat()
        except OSError as exc:
            raise ConfigError(f"redis.payload_spool: cannot use {self.directory} "
                              f"({exc.strerror})") from None
        mode = status.st_mode & 0o777
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
            # e.g. made in advance by another user in a shared place such as /dev/shm
            raise ConfigError(f"redis.payload_spool: {self.directory} is not a directory "
                              "owned by this user")
        if mode & 0o077:
            raise ConfigError(f"redis.payload_spool: {self.directory} is open to other users "
                              f"(mode {mode:o}); make it 0700")

    def put(self, payload: bytes | memoryview) -> str:
        """Write ``payload`` under a fresh name and return the name."""
        name = uuid.uuid4().hex
        descriptor = os.open(self.directory / name,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(payload)
            while view:  # one write in practice; a short write is finished, not lost
                view = view[os.write(descriptor, view):]
        except BaseException:
            os.close(descriptor)
            self.remove(name)
            raise
        os.close(descriptor)
        return name

    def take(self, name: str) -> bytes | None:
        """The payload stored as ``name``; ``None`` if it cannot be read (no such file, no
        access) or the name is not one this spool would make: that request fails alone."""
        if not _NAME.fullmatch(name):
            return None
        try:
            return (self.directory / name).read_bytes()
        except OSError:
            return None

    def remove(self, name: str) -> None:
        if _NAME.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def sweep(self, older_than_s: float) -> int:
        """Remove payloads written more than ``older_than_s`` ago; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if _NAME.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue  # taken meanwhile
        return removed
