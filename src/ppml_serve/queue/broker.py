"""The broker contract, independent of Redis.

Meaning of the operations, as the worker sees them:

- ``read``: take up to N new requests; each becomes *pending* on this consumer until acked.
- ``finish``: post the replies, then *ack* and delete the requests they answer, in one
  round trip. A request is acked only after its reply is posted, so a crash in between
  leaves it pending and it is answered again (callers ignore a second answer).
- ``reclaim``: take over requests pending on any consumer for longer than ``min_idle_ms``
  (a crashed or stuck worker); each carries how often it has been delivered so far.
- ``dead_letter``: move a request that keeps failing to the dead-letter stream, answer its
  caller with an error, and ack it.

Nothing is ever trimmed from a request stream: requests leave it only by being answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Delivery:
    """One request as handed to a worker."""

    entry_id: str
    request_id: str
    reply_to: str
    body: bytes = field(repr=False)
    deadline_ms: int
    deliveries: int = 1
    mode: str = ""
    """``e2e`` when the body holds a request sealed by the client to the workers' key."""


@dataclass(frozen=True)
class Reply:
    """One answer for a gateway's reply stream; ``body`` is sealed."""

    delivery: Delivery
    ok: bool
    body: bytes = field(repr=False)
    batch_size: int = 1


@dataclass(frozen=True)
class ReplyMessage:
    """One answer as a gateway reads it."""

    request_id: str
    ok: bool
    body: bytes = field(repr=False)
    batch_size: int


class WorkerBroker(Protocol):
    """The worker's side of the queue for one model."""

    def ensure_group(self) -> None: ...

    def publish(self, spec_json: str) -> None: ...

    def heartbeat(self) -> None: ...

    def publish_attestation(self, document: str) -> None: ...

    def leave(self) -> None: ...

    def read(self, count: int, block_ms: int) -> list[Delivery]: ...

    def finish(self, replies: Sequence[Reply]) -> None: ...

    def drop(self, deliveries: Sequence[Delivery]) -> None: ...

    def reclaim(self, min_idle_ms: int, count: int) -> list[Delivery]: ...

    def dead_letter(self, reply: Reply, reason: str) -> None: ...
