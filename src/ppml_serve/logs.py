"""Logging set-up: text or JSON lines, the id of the request a line is about, and the named
loggers operators route: ``ppml_serve.access`` (one line per API call) and
``ppml_serve.audit`` (key releases and admin actions). No payload byte is ever logged: lines
carry ids, names, sizes, statuses and timings only."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

request_id: ContextVar[str] = ContextVar("request_id", default="")
"""Id of the request being handled (set by the gateway); empty outside a request."""

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: a CR/LF inside a message (from a caller-chosen value) would
        # let it forge a line of its own. Tracebacks are appended after this, unescaped.
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any ``extra``;
    with ``part``, which part wrote it (``gateway``, ``worker``, ``keybroker``…) and its
    process id, so that lines of many parts gathered in one place can be told apart."""

    def __init__(self, part: str | None = None) -> None:
        super().__init__()
        self._part = {"part": part, "pid": os.getpid()} if part else {}

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            **self._part}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value not in ("", None):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A size-bounded file of lines (``PATH``, ``PATH.1`` … ``PATH.N``), owner-only, never
    opened through a symlink."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, delay=False)

    def _open(self) -> Any:
        fd = os.open(self.baseFilename,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


class RotatingLogFile(PrivateRotatingFile):
    """A process's log file. The process's stdout and stderr follow it across rotations, so
    that a traceback or a library's print lands in the current file too, never in a pipe that
    someone has to read."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, max_bytes, backups)
        self._redirect()

    def doRollover(self) -> None:
        super().doRollover()
        self._redirect()

    def _redirect(self) -> None:
        if self.stream is not None:
            for standard in (1, 2):
                os.dup2(self.stream.fileno(), standard)


def configure_logging(level: str = "INFO", log_format: str = "text",
                      log_file: Path | None = None, max_bytes: int = 10 << 20,
                      backups: int = 3, part: str | None = None) -> None:
    """Replace the root handler's format (safe to call again once settings are known);
    with ``log_file``, the root logger writes that rotating file instead of stderr; ``part``
    names the writer in JSON lines."""
    root = logging.getLogger()
    root.setLevel(level)
    if log_file is not None and not any(isinstance(h, RotatingLogFile) for h in root.handlers):
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(RotatingLogFile(log_file, max_bytes, backups))
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter(part) if log_format == "json" else TextFormatter())
        if not any(isinstance(f, _RequestIdFilter) for f in handler.filters):
            handler.addFilter(_RequestIdFilter())
    logging.getLogger("httpx").setLevel(logging.WARNING)
