"""Large request payloads beside the queue instead of in it, for parts on one host.

When gateway, Redis and workers share a host, a payload that goes through Redis is copied
into Redis, appended to its log, and copied out again: most of Redis's CPU per request.
A spool is a private directory (0700, files 0600) the gateway writes each large payload to
(a sealed record, as it would be in Redis); the stream entry carries only the file's name.
The worker that takes the entry reads the file; whoever acks the entry releases it. Files
outlive any process that dies (a reclaimed entry still finds its payload); what nobody
released (a crash between ack and release, an entry lost with Redis) is swept by age.

Released files are recycled, not deleted: renamed into ``free/`` and overwritten by a later
payload. Writing into a file's existing pages costs a copy; a new file's pages must be
allocated first, which costs several times more (~200 µs per 600 KB here, against ~25 µs).
A writer claims a free file by renaming it (atomic: one claimer wins), writes it under a
working name (``NAME.w``) and renames it to its payload name once complete, so a reader never
sees a half-written payload. Free files idle for ``FREE_IDLE_S`` are deleted by the sweep.
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
_WORKING = re.compile(r"[0-9a-f]{32}\.w")
FREE_IDLE_S = 30.0
"""How long a released file waits in ``free/`` for reuse before the sweep deletes it."""
_FREE_BATCH = 256
"""Names of free files a writer takes from one listing of ``free/``."""
RESCAN_S = 0.05
"""After a listing of ``free/`` found nothing, how long a writer creates new files instead."""


class PayloadSpool:
    """One host's spool directory, shared by its gateways and workers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.free = directory / "free"
        # plain strings on the per-payload path: pathlib's joins cost more than the syscalls
        self._directory = os.fspath(directory)
        self._free = os.fspath(self.free)
        self._reusable: list[str] = []
        self._next_listing = 0.0

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
        try:
            self.free.mkdir(mode=0o700, exist_ok=True)
            free = self.free.lstat()
        except OSError as exc:
            raise ConfigError(f"redis.payload_spool: cannot use {self.free} "
                              f"({exc.strerror})") from None
        if not stat.S_ISDIR(free.st_mode) or free.st_uid != os.geteuid():
            raise ConfigError(f"redis.payload_spool: {self.free} is not a directory owned by "
                              "this user")

    def put(self, payload: bytes | memoryview) -> str:
        """Write ``payload`` under a fresh name (into a recycled file when there is one) and
        return the name."""
        name = uuid.uuid4().hex
        final = f"{self._directory}/{name}"
        while (reusable := self._next_reusable()) is not None:
            working = f"{final}.w"
            try:
                os.rename(f"{self._free}/{reusable}", working)  # the claim: one claimer wins
            except FileNotFoundError:
                continue  # taken by another writer, or deleted by a sweep
            self._write(working, payload, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.rename(working, final)
            return name
        self._write(final, payload, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        return name

    def _next_reusable(self) -> str | None:
        """A name in ``free/`` to try, from a listing taken at most every ``RESCAN_S`` while
        it finds nothing (a listing per payload would cost more than it saves)."""
        if not self._reusable and time.monotonic() >= self._next_listing:
            try:
                with os.scandir(self._free) as entries:
                    for entry in entries:
                        if _NAME.fullmatch(entry.name):
                            self._reusable.append(entry.name)
                            if len(self._reusable) >= _FREE_BATCH:
                                break
            except OSError:
                pass  # no free/ (an older part made this spool): new files only
            if not self._reusable:
                self._next_listing = time.monotonic() + RESCAN_S
        return self._reusable.pop() if self._reusable else None

    @staticmethod
    def _write(path: str, payload: bytes | memoryview, flags: int) -> None:
        """``path`` holds exactly ``payload`` (a recycled file is cut to its length), or is
        gone and the error raised."""
        descriptor = os.open(path, flags, 0o600)
        try:
            view = memoryview(payload)
            offset = 0
            while offset < len(view):  # one write in practice; a short one is finished
                offset += os.pwrite(descriptor, view[offset:], offset)
            os.ftruncate(descriptor, offset)
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        os.close(descriptor)

    def take(self, name: str) -> bytes | None:
        """The payload stored as ``name``; ``None`` if it cannot be read (no such file, no
        access) or the name is not one this spool would make: that request fails alone."""
        if not _NAME.fullmatch(name):
            return None
        try:
            return (self.directory / name).read_bytes()
        except OSError:
            return None

    def release(self, name: str) -> None:
        """``name``'s payload is no longer needed: its file goes to ``free/`` for reuse (or
        is deleted when it cannot); already gone is fine."""
        if not _NAME.fullmatch(name):
            return
        path = f"{self._directory}/{name}"
        try:
            os.rename(path, f"{self._free}/{name}")
        except FileNotFoundError:
            return
        except OSError:  # no free/ here (an older part made this spool)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def sweep(self, older_than_s: float, free_idle_s: float = FREE_IDLE_S) -> int:
        """Remove payloads written more than ``older_than_s`` ago, and working files a
        writer left that long ago (it died); returns how many payloads. Free files idle for
        ``free_idle_s`` are deleted too (not counted)."""
        cutoff = time.time() - older_than_s
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if _NAME.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                    # a claimed file's change time is its claim (the rename), not its age
                    elif _WORKING.fullmatch(entry.name) and entry.stat().st_ctime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # taken meanwhile
        idle_cutoff = time.time() - free_idle_s
        with contextlib.suppress(FileNotFoundError), os.scandir(self.free) as entries:
            for entry in entries:
                # released at its change time (the rename into free/)
                with contextlib.suppress(FileNotFoundError):
                    if _NAME.fullmatch(entry.name) and entry.stat().st_ctime < idle_cutoff:
                        os.unlink(entry.path)
        return removed
