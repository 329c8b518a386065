"""What ``up`` prints never holds up serving: a bounded, dropping output and a log follower.

Each child of ``up`` writes its own rotating log file in the state directory (see
``logs.RotatingLogFile``); ``up`` follows those files and copies their lines to its own
stderr through a ``DroppingOutput``. When nobody reads ``up``'s output (it is stopped, piped
into a paused ``less``, or its reader is gone) lines are dropped and counted; no child ever
blocks in ``write()``, and neither does ``up``'s supervision loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

DEFAULT_BUFFER_BYTES = 1 << 20
"""What an output holds for a slow reader before it starts dropping lines."""


class DroppingOutput:
    """A text stream (``write``/``flush``) over a file descriptor, written by its own thread.

    ``write`` never blocks and never raises: past ``max_bytes`` of unwritten output it drops
    the line and counts it; once the reader catches up it says how many were dropped. A
    closed reader (EPIPE, a closed terminal) turns it into a counter only. The thread writes
    with ``os.write`` on its own descriptor, holding no lock of Python's streams, so a
    reader that never reads cannot hold up the interpreter's exit either."""

    def __init__(self, target: int, max_bytes: int = DEFAULT_BUFFER_BYTES,
                 name: str = "output", where_logs_are: str = "") -> None:
        self._target = target
        self._max_bytes = max_bytes
        self._where = where_logs_are
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._lock = threading.Condition()
        self.dropped = 0
        """Lines dropped because the reader did not keep up (or is gone)."""
        self._reported = 0
        self.broken = False
        """The reader is gone: nothing more is written."""
        self._closing = False
        self._thread = threading.Thread(target=self._drain, name=f"{name} writer", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        self.write_bytes(text.encode("utf-8", "replace"))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if self.broken or self._closing or self._buffered + len(data) > self._max_bytes:
                self.dropped += max(1, data.count(b"\n"))
                return
            self._chunks.append(data)
            self._buffered += len(data)
            self._lock.notify()

    def flush(self) -> None:
        """Nothing to do: the writer thread flushes what it writes (here for ``logging``)."""

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is buffered, for at most ``timeout_s``; then stop."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout_s)

    def _next(self) -> bytes | None:
        with self._lock:
            while not self._chunks:
                if self._closing:
                    return None
                if self.dropped > self._reported:
                    count, self._reported = self.dropped - self._reported, self.dropped
                    where = f"; full logs in {self._where}" if self._where else ""
                    return (f"[ppml-serve: {count} output line(s) dropped: output not read fast "
                            f"enough{where}]\n").encode()
                self._lock.wait()
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return data

    def _drain(self) -> None:
        while True:
            data = self._next()
            if data is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._target, view):]
            except OSError:  # EPIPE, a closed terminal, a closed descriptor
                with self._lock:
                    self.broken = True
                    self.dropped += max(1, data.count(b"\n"))
                    self._chunks.clear()
                    self._buffered = 0
                return


@dataclass
class _Followed:
    path: Path
    on_line: Callable[[str], None]
    handle: BinaryIO | None = None
    inode: int = 0
    partial: bytes = b""


@dataclass
class LogFollower:
    """Follows log files as they grow and rotate (``tail -F``) and copies each new line to an
    output; ``on_line`` also gets every line (a child's crash report keeps the last ones)."""

    output: DroppingOutput | None
    interval_s: float = 0.1
    _files: dict[Path, _Followed] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def follow(self, path: Path, on_line: Callable[[str], None]) -> None:
        """Follow ``path`` from its current end: lines of earlier runs are not copied again.
        Call it before the writer starts, so that none of its lines is missed."""
        with self._lock:
            if path in self._files:  # a restarted or replaced part: its lines go on
                self._files[path].on_line = on_line
                return
            followed = self._files[path] = _Followed(path, on_line)
            with contextlib.suppress(FileNotFoundError):
                self._open(followed).seek(0, os.SEEK_END)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Copy what is left, then stop following."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.poll()
        with self._lock:
            for followed in self._files.values():
                if followed.handle is not None:
                    followed.handle.close()
                    followed.handle = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            files = list(self._files.values())
        for followed in files:
            with contextlib.suppress(OSError):
                self._read(followed)

    def _read(self, followed: _Followed) -> None:
        try:
            status = os.stat(followed.path, follow_symlinks=False)
        except FileNotFoundError:
            status = None
        if followed.handle is not None:
            self._emit(followed, followed.handle.read())
            if status is not None and status.st_ino != followed.inode:
                followed.handle.close()  # rotated: the rest of the old file is read
                followed.handle = None
        if followed.handle is None and status is not None:
            # a new file (after a rotation): all of it
            self._emit(followed, self._open(followed).read())

    @staticmethod
    def _open(followed: _Followed) -> BinaryIO:
        fd = os.open(followed.path, os.O_RDONLY | os.O_NOFOLLOW)
        followed.handle = os.fdopen(fd, "rb")
        followed.inode = os.fstat(fd).st_ino
        return followed.handle

    def _emit(self, followed: _Followed, data: bytes) -> None:
        if not data:
            return
        data = followed.partial + data
        complete, newline, followed.partial = data.rpartition(b"\n")
        if not newline:
            return
        chunk = complete + newline
        if self.output is not None:
            self.output.write_bytes(chunk)
        for line in chunk.decode("utf-8", "replace").splitlines():
            followed.on_line(line)
