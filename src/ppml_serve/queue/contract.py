"""The queue contract between gateway, Redis and worker: typed records and both sides' protocols.

Meaning of the operations, as the worker sees them:

- ``read``: take up to N new requests; each becomes *pending* on this consumer until acked.
- ``finish``: post the replies (to the gateway's reply stream, or into the job record for a
  job), then *ack* and delete the requests they answer, atomically, and only for requests
  still pending on this consumer. A request taken over by another worker (this one froze or
  was presumed dead) is answered by that worker only: a late answer is dropped, never
  delivered twice. A crash between reading and finishing leaves the request pending and it
  is answered again by whoever reclaims it.
- ``reclaim_dead``: take over every request pending on a consumer whose heartbeat expired,
  then remove that consumer from the group.
- ``reclaim``: take over requests pending on any consumer for longer than ``min_idle_ms``
  (a worker alive but stuck); each carries how often it has been delivered so far.
- ``dead_letter``: move a request that keeps failing to the dead-letter stream, answer its
  caller with an error, and ack it.

Nothing is ever trimmed from a request stream: requests leave it only by being answered.
Only this module and the ``redis_*`` modules know the field layout; everything else sees the
records below.

Each served model version has its own queue, named by ``queue_name``; the name is also what
sealed records bind as their model, so an answer from version 2 cannot pass for version 1's.

The model repository is steered through two more records: a ``ModelState`` per model (what
an administrator asked for: load or unload) and a ``HostStatus`` per worker process (which
models and versions its repository holds and what it has loaded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ppml_serve.errors import (
    EngineError,
    IntegrityError,
    InvalidInput,
    PPMLError,
    ProtocolError,
)


class Mode(str, Enum):
    """How a request's body is to be opened by the worker."""

    STANDARD = ""
    """The body is the gateway's sealed tensor record."""
    SEALED = "e2e"
    """The body wraps a record the client sealed to the workers' attested key."""

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return cls(text)
        except ValueError:
            raise ProtocolError("request has an unknown mode") from None


class ErrorKind(str, Enum):
    """Why a worker answered an item with an error; the gateway maps it back to an error."""

    INVALID_INPUT = "invalid_input"
    INTEGRITY = "integrity"
    PROTOCOL = "protocol"
    ENGINE = "engine"
    DEAD_LETTER = "dead_letter"

    @classmethod
    def of(cls, error: BaseException | None) -> ErrorKind:
        for kind, exception in _KIND_ERRORS:
            if isinstance(error, exception):
                return kind
        return cls.ENGINE


_KIND_ERRORS: tuple[tuple[ErrorKind, type[PPMLError]], ...] = (
    (ErrorKind.INTEGRITY, IntegrityError),
    (ErrorKind.INVALID_INPUT, InvalidInput),
    (ErrorKind.PROTOCOL, ProtocolError),
    (ErrorKind.ENGINE, EngineError),
)


VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")
"""Model versions are positive integers, as in Triton's repository layout."""


def queue_name(model: str, version: str) -> str:
    """The queue (and sealed-record identity) of one model version. Version 1 keeps the
    model's bare name, so single-version deployments keep their stream names."""
    return model if version == "1" else f"{model}@{version}"


def split_queue_name(queue: str) -> tuple[str, str]:
    """``(model, version)`` of a queue name."""
    model, _, version = queue.partition("@")
    return model, version or "1"


class VersionState(str, Enum):
    """A model version's state, as the repository API reports it (Triton's words)."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelState:
    """What an administrator last asked of a model (``load`` or ``unload``); ``serial``
    grows with each request, so a host reloads the model's directory on every new load."""

    action: str
    serial: int

    def to_json(self) -> str:
        return json.dumps({"action": self.action, "serial": self.serial})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelState | None:
        try:
            document = json.loads(text)
            action, serial = str(document["action"]), int(document["serial"])
        except (ValueError, KeyError, TypeError):
            return None
        return cls(action, serial) if action in ("load", "unload") else None


@dataclass(frozen=True)
class VersionStatus:
    state: VersionState
    reason: str = ""


@dataclass
class HostStatus:
    """One worker process's view: the versions its repository holds per model, and the
    state of each version it serves or tried to serve."""

    host: str
    seen: float
    available: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, dict[str, VersionStatus]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Models this host cannot serve at all (e.g. an invalid config.yaml), with why."""
    serials: dict[str, int] = field(default_factory=dict)
    """Per model, the serial of the last load/unload request this host has acted on."""

    def to_json(self) -> str:
        return json.dumps({
            "host": self.host, "seen": self.seen, "available": self.available,
            "errors": self.errors, "serials": self.serials,
            "versions": {model: {version: [status.state.value, status.reason]
                                 for version, status in states.items()}
                         for model, states in self.versions.items()}})

    @classmethod
    def from_json(cls, text: str | bytes) -> HostStatus | None:
        try:
            document: dict[str, Any] = json.loads(text)
            return cls(str(document["host"]), float(document["seen"]),
                       {str(m): [str(v) for v in vs]
                        for m, vs in dict(document["available"]).items()},
                       {str(m): {str(v): VersionStatus(VersionState(s[0]), str(s[1]))
                                 for v, s in dict(states).items()}
                        for m, states in dict(document["versions"]).items()},
                       {str(m): str(e) for m, e in dict(document.get("errors", {})).items()},
                       {str(m): int(n) for m, n in dict(document.get("serials", {})).items()})
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def error_body(kind: ErrorKind, message: str) -> bytes:
    """The plaintext of an error answer (sealed like any answer)."""
    return json.dumps({"kind": kind.value, "error": message}).encode()


@dataclass(frozen=True)
class Delivery:
    """One request as handed to a worker."""

    entry_id: str
    request_id: str
    reply_to: str
    """Reply stream of the gateway waiting for the answer; empty for a job."""
    body: bytes = field(repr=False)
    deadline_ms: int
    deliveries: int = 1
    mode: Mode = Mode.STANDARD
    job_ttl_s: int = 0
    """For a job (``reply_to`` empty): how long its answer is kept for fetching."""
    enqueued_ms: int = 0
    """When the gateway queued it (unix ms, from the stream entry id)."""
    traceparent: str = ""
    """W3C trace context of the gateway's span, in the record's clear header (not secret)."""
    payload_file: str = ""
    """Name of the payload in the host's spool (``queue/spool.py``), when it was not in the
    stream entry; ``body`` is then what the spool held (empty if the file was missing)."""

    @property
    def is_job(self) -> bool:
        return self.job_ttl_s > 0


@dataclass(frozen=True)
class Reply:
    """One answer for a gateway's reply stream (or a job record); ``body`` is sealed."""

    delivery: Delivery
    ok: bool
    body: bytes = field(repr=False)
    batch_size: int = 1
    queue_s: float = 0.0
    """Time from enqueue to the start of its batch in the worker."""
    engine_s: float = 0.0
    """Time of its batch in the engine."""


class JobState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class WorkerBroker(Protocol):
    """The worker's side of the queue for one model."""

    def ensure_group(self) -> None: ...

    def publish(self, sealed_spec: bytes) -> None: ...

    def heartbeat(self) -> None: ...

    def publish_attestation(self, document: str) -> None: ...

    def remember_once(self, token: str, owner: str, ttl_ms: int) -> bool:
        """Record ``token`` for ``ttl_ms``; False when another ``owner`` recorded it first."""
        ...

    def leave(self) -> None: ...

    def read(self, count: int, block_ms: int) -> list[Delivery]: ...

    def finish(self, replies: Sequence[Reply]) -> int: ...

    def drop(self, deliveries: Sequence[Delivery]) -> None: ...

    def reclaim_dead(self, dead_after_s: float, count: int) -> list[Delivery]: ...

    def reclaim(self, min_idle_ms: int, count: int) -> list[Delivery]: ...

    def dead_letter(self, reply: Reply, reason: str) -> None: ...


class RequestQueue(Protocol):
    """A model's request stream as the gateway's checks see it (the requests themselves are
    queued and answered by the native front). Every method of these gateway protocols
    raises ``NotReady`` when Redis is unreachable, never a client-library error."""

    async def backlog(self, model: str) -> int: ...


class Presence(Protocol):
    """What workers announce: the models they serve, their liveness, their attestations."""

    async def models(self) -> dict[str, bytes]: ...

    async def live_workers(self, model: str, max_age_s: float) -> int: ...

    async def attestations(self, model: str) -> list[str]: ...

    async def queue_stats(self, model: str, max_age_s: float) -> QueueStats: ...


class Registry(Protocol):
    """The model repository's control records: what gateways ask, what hosts report."""

    async def model_states(self) -> dict[str, ModelState]: ...

    async def request_model_state(self, model: str, action: str) -> ModelState: ...

    async def host_statuses(self, max_age_s: float) -> list[HostStatus]: ...


class GatewayBroker(RequestQueue, Presence, Registry, Protocol):
    """A gateway's whole side of the queue (one connection for the three roles)."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def delete_streams(self, streams: set[str]) -> None:
        """Remove reply streams of this gateway's that another reader used (the native
        front's); Redis down is fine (they expire with the trimming)."""


class RepositoryControl(Protocol):
    """A worker process's side of the model repository's control records."""

    def model_states(self) -> dict[str, ModelState]: ...

    def publish_host(self, status: HostStatus, max_age_s: float) -> None: ...

    def forget_host(self, host: str) -> None: ...


@dataclass(frozen=True)
class QueueStats:
    """What an autoscaler or an operator wants to know of one model's queue."""

    depth: int
    """Requests in the stream: waiting or being worked on."""
    lag: int
    """Requests no worker has taken yet (what KEDA's redis-streams scaler calls lag)."""
    pending: int
    """Requests taken by a worker and not yet answered."""
    live_workers: int

    @property
    def backlog(self) -> int:
        """Requests not yet answered: waiting or taken (lag + pending). Closed-loop clients
        keep the lag near 0 (workers take requests at once), so only this sees their load."""
        return self.lag + self.pending
