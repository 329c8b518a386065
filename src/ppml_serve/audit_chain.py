"""A tamper-evident audit log: one JSON object per line, each carrying the SHA-256 of the line
before it, so that an edited, inserted, reordered or removed line breaks the chain.

Every field is JSON-escaped, so no value (a CR/LF in a caller-chosen provider name, say) can
forge a line. A head file beside the log (``LOG.head``: the last sequence number and hash)
makes cutting lines off the end detectable too; ``ppml-serve audit verify LOG`` checks it all.
Whoever can rewrite both files can rewrite history: ship the lines (or the head, now and
then) somewhere the service cannot write, as any append-only log requires.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(entry: dict[str, Any]) -> str:
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)


def _last_entry(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "hash" in entry:
            return entry
    return None


class AuditChain:
    """Appends chained entries to ``path`` (0600, never through a symlink), thread-safe."""

    def __init__(self, path: Path, part: str) -> None:
        self.path = path
        self.part = part
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        last = _last_entry(path)
        self._seq = int(last["seq"]) + 1 if last else 0
        self._prev = str(last["hash"]) if last else GENESIS
        self._fd = _open_append(path)

    def append(self, event: str, level: str = "INFO", **fields: Any) -> dict[str, Any]:
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "part": self.part, "level": level, "event": event, **fields,
                "prev": self._prev}
            entry["hash"] = _digest(entry)
            os.write(self._fd, (json.dumps(entry, default=str) + "\n").encode())
            head = self.path.with_name(self.path.name + ".head")
            temporary = head.with_name(head.name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, json.dumps({"seq": self._seq, "hash": entry["hash"]}).encode())
            finally:
                os.close(fd)
            os.replace(temporary, head)
            self._seq += 1
            self._prev = entry["hash"]
            return entry

    def close(self) -> None:
        os.close(self._fd)


class AuditHandler(logging.Handler):
    """Writes every record of the ``ppml_serve.audit`` logger into an ``AuditChain``; the
    record's ``audit`` extra (a dict of fields) rides along, escaped like the message."""

    def __init__(self, chain: AuditChain) -> None:
        super().__init__(logging.INFO)
        self.chain = chain

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "audit", None)
            self.chain.append(record.getMessage(), record.levelname,
                              **(fields if isinstance(fields, dict) else {}))
        except Exception:  # a full disk must not take the service down: logging's own path
            self.handleError(record)


def attach(path: Path, part: str) -> AuditChain:
    """Route the audit logger of this process into ``path`` as well (once)."""
    logger = logging.getLogger("ppml_serve.audit")
    for handler in logger.handlers:
        if isinstance(handler, AuditHandler):
            return handler.chain
    chain = AuditChain(path, part)
    logger.addHandler(AuditHandler(chain))
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return chain


@dataclass(frozen=True)
class Verdict:
    entries: int
    problem: str | None
    """None when the chain is intact; else the first problem, with its line number."""


def verify(path: Path) -> Verdict:
    prev, seq, count = GENESIS, 0, 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                return Verdict(count, f"line {number} is not a JSON entry (edited or injected)")
            if not isinstance(entry, dict):
                return Verdict(count, f"line {number} is not a JSON entry (edited or injected)")
            if entry.get("seq") != seq:
                return Verdict(count, f"line {number}: sequence {entry.get('seq')} where {seq} "
                                      "was due (a line was removed, inserted or reordered)")
            if entry.get("prev") != prev:
                return Verdict(count, f"line {number} does not follow the line before it")
            if entry.get("hash") != _digest(entry):
                return Verdict(count, f"line {number} was edited (its hash does not match)")
            prev, seq, count = str(entry["hash"]), seq + 1, count + 1
    head = path.with_name(path.name + ".head")
    if head.exists():
        try:
            expected = json.loads(head.read_text())
        except ValueError:
            return Verdict(count, f"{head.name} is damaged")
        if expected.get("seq") != seq - 1 or expected.get("hash") != prev:
            return Verdict(count, f"the log ends at entry {seq - 1} but {head.name} records "
                                  f"entry {expected.get('seq')}: lines were cut off the end")
    return Verdict(count, None)
