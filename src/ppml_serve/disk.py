"""Free space on the volumes a part writes (the state directory: Redis's AOF, the payload
spool, the logs). Below a floor the gateway stops taking new work (503 + Retry-After, not
ready) while there is still room for the answers in flight, and serves again by itself
once space is back."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ppml_serve.errors import NotReady

CHECK_INTERVAL_S = 1.0
"""statvfs is cheap, but not per request: the answer is reused this long."""


class DiskWatch:
    """Free bytes of each watched directory's volume, looked up at most once a second."""

    def __init__(self, paths: Sequence[Path], min_free_bytes: int,
                 clock: Callable[[], float] = time.monotonic,
                 statvfs: Callable[[Path], os.statvfs_result] = os.statvfs) -> None:
        self._paths = list(dict.fromkeys(paths))
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._free: dict[str, int] = {}

    def free_bytes(self) -> dict[str, int]:
        """Bytes an unprivileged writer can still use, by directory (existing ones only)."""
        with self._lock:
            if self._clock() - self._checked >= CHECK_INTERVAL_S:
                free = {}
                for path in self._paths:
                    try:
                        status = self._statvfs(path)
                    except OSError:
                        continue  # not there (yet): nothing written there either
                    free[str(path)] = status.f_bavail * status.f_frsize
                self._free, self._checked = free, self._clock()
            return dict(self._free)

    def shortage(self) -> str | None:
        """Why new work must wait, or None when every volume has room."""
        if self.min_free_bytes <= 0:
            return None
        for path, free in self.free_bytes().items():
            if free < self.min_free_bytes:
                return (f"the volume of {path} has {free / 2**20:.0f} MiB free, below "
                        f"redis.min_free_disk_mb ({self.min_free_bytes / 2**20:.0f} MiB); "
                        "free space there (old logs, other files) and service resumes by itself")
        return None

    def check(self) -> None:
        """Raise ``NotReady`` (503) when a watched volume is below the floor."""
        problem = self.shortage()
        if problem is not None:
            raise NotReady(problem)
