"""The worker loop: a reader thread feeds a batcher; the main thread opens, infers and replies.

A reader thread is needed because a blocking XREADGROUP cannot time out in the few
milliseconds a batch may wait (Redis resolves blocking timeouts to ~100 ms).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from opentelemetry.context import Context

from ppml_serve.backoff import Backoff
from ppml_serve.codecs import record
from ppml_serve.crypto.attestation.base import Provider, report_data
from ppml_serve.crypto.attestation.policy import publication_binding
from ppml_serve.crypto.e2e import WINDOW_S as E2E_WINDOW_S
from ppml_serve.crypto.e2e import WorkerKey
from ppml_serve.crypto.envelope import REPLY, REQUEST, SPEC, Sealer, associated_data
from ppml_serve.engines.base import Engine
from ppml_serve.errors import EngineError, IntegrityError, InvalidInput, ProtocolError
from ppml_serve.queue.contract import (
    Delivery,
    ErrorKind,
    Mode,
    Reply,
    WorkerBroker,
    error_body,
    split_queue_name,
)
from ppml_serve.settings import WorkerSettings
from ppml_serve.tracing import context_of, span_between
from ppml_serve.worker.batching import Item, run_batched
from ppml_serve.worker.intake import BatchIntake, Fate
from ppml_serve.worker.metrics import WorkerMetrics
from ppml_serve.worker.retries import RetryPolicy

log = logging.getLogger("ppml_serve.worker")

ATTESTATION_REFRESH_S = 30.0


@dataclass
class _Work:
    delivery: Delivery
    item: Item | None = None
    error: Exception | None = None
    reply_key: AESGCM | None = None
    queue_s: float = 0.0
    engine_s: float = 0.0
    trace: Context | None = None
    """The gateway's span this request's spans belong to (when traced)."""


class Worker:
    """Serves one model version from its request stream until ``stop`` is called.

    ``model`` is the version's queue name (``queue_name``): what its records bind."""

    def __init__(self, model: str, engine: Engine, broker: WorkerBroker,
                 reader_broker: WorkerBroker, sealer: Sealer,
                 settings: WorkerSettings, worker_key: WorkerKey | None = None,
                 provider: Provider | None = None, measurement: str = "",
                 metrics: WorkerMetrics | None = None,
                 announce: dict[str, Any] | None = None) -> None:
        self._model = model
        self._name, self._version = split_queue_name(model)
        self._labels = (self._name, self._version)
        self._announce = announce or {}
        self._engine = engine
        self._broker = broker
        self._reader_broker = reader_broker
        self._sealer = sealer
        self._settings = settings
        self._intake = BatchIntake(model, engine.spec, sealer, settings.max_rows_per_request)
        self._inbox: queue.Queue[Delivery] = queue.Queue(maxsize=settings.max_batch_size)
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._worker_key = worker_key
        self._provider = provider
        self._measurement = measurement
        self._retries = RetryPolicy(settings.max_deliveries)
        self._attested_at = 0.0
        self.batches_served = 0
        self.metrics = metrics or WorkerMetrics()
        streams = settings.streams
        self._pool = (concurrent.futures.ThreadPoolExecutor(streams, "batch")
                      if streams > 1 else None)
        self._slots = threading.BoundedSemaphore(max(streams, 2))
        self._replier = concurrent.futures.ThreadPoolExecutor(1, "replier")
        self._single_items = True
        """Whether the last batch held one request: at low load, do not wait to fill one."""

    def _publish_attestation(self) -> None:
        """Evidence binding the model's end-to-end key, for clients that seal to it."""
        if self._worker_key is None or self._provider is None:
            return
        if time.monotonic() - self._attested_at < ATTESTATION_REFRESH_S:
            return
        public = self._worker_key.public
        issued_at = int(time.time())
        binding = publication_binding(self._model, issued_at)
        evidence = self._provider.evidence(self._measurement, report_data(public, binding),
                                           binding)
        self._broker.publish_attestation(json.dumps({
            "provider": self._provider.name, "evidence": evidence, "model": self._model,
            "issued_at": issued_at, "public_key": base64.b64encode(public).decode(),
            "measurement": self._measurement}))
        self._attested_at = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def joined(self) -> bool:
        """Whether its spec is announced: before that, gateways cannot route to it."""
        return self._joined.is_set()

    def _submit(self, batch: list[Delivery]) -> None:
        """Run ``batch`` now, or beside the ones in flight when ``streams`` > 1.

        With one stream, answers are sealed and posted by a second thread when more requests
        are waiting, so that the engine starts on the next batch instead of waiting for Redis;
        at low load they are posted at once (a thread hand-off would only add latency).
        """
        if self._pool is None:
            work = self._infer(batch)
            if self._inbox.empty():
                self._answer(work)
                return
            self._slots.acquire()
            self._replier.submit(self._answer, work).add_done_callback(self._release_slot)
            return
        self._slots.acquire()
        future = self._pool.submit(self.process, batch)
        future.add_done_callback(self._release_slot)

    def _release_slot(self, future: concurrent.futures.Future[None]) -> None:
        self._slots.release()
        error = future.exception()
        if error is not None:  # answers were not posted: the batch stays pending, reclaimed
            log.error("a batch failed (%s); its requests will be reclaimed",
                      type(error).__name__)

    def run(self) -> None:
        """Serve until ``stop``; survives Redis outages (reconnects with backoff)."""
        self._retry_until_done(self._join, "joining the queue")
        self._joined.set()
        reader = threading.Thread(target=self._read_loop, name="stream-reader", daemon=True)
        beater = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        reader.start()
        beater.start()
        log.info("worker serving model %r version %s", self._name, self._version)
        next_scan = 0.0
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_scan:
                    self._maintain()
                    next_scan = time.monotonic() + self._settings.heartbeat_s
                batch = self._collect(timeout_s=min(0.5, self._settings.heartbeat_s))
                if batch:
                    self._submit(batch)
            self._drain(reader)
        finally:
            self._broker.leave()
            log.info("worker for model %r version %s stopped", self._name, self._version)

    def _join(self) -> None:
        self._broker.ensure_group()
        spec = json.dumps({**self._engine.spec.as_json(), **self._announce}).encode()
        self._broker.publish(self._sealer.seal(spec, associated_data(self._model, "", SPEC)))

    def _retry_until_done(self, action: Callable[[], None], what: str) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            try:
                action()
                return
            except Exception as exc:  # Redis unreachable: wait for it, never exit
                delay = backoff.next_delay()
                log.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__,
                            delay)
                self._stopping.wait(delay)

    def _drain(self, reader: threading.Thread) -> None:
        """On stop: read nothing new, answer everything taken (ack), then return."""
        leftovers: list[Delivery] = []
        while reader.is_alive():  # the reader may be blocked handing over its last read
            leftovers.extend(self._take_inbox())
            reader.join(0.05)
        leftovers.extend(self._take_inbox())
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._replier.shutdown(wait=True)
        if leftovers:
            log.info("answering %d request(s) taken before stopping", len(leftovers))
            self.process(leftovers)

    def _take_inbox(self) -> list[Delivery]:
        taken = []
        while True:
            try:
                taken.append(self._inbox.get_nowait())
            except queue.Empty:
                return taken

    def _heartbeat_loop(self) -> None:
        """Liveness in its own thread, so that a long engine call is not taken for death."""
        backoff = Backoff(0.1, self._settings.heartbeat_s)
        while not self._stopping.is_set():
            try:
                self._broker.heartbeat()
                backoff.reset()
                delay = self._settings.heartbeat_s
            except Exception as exc:
                delay = backoff.next_delay()
                log.warning("heartbeat failed (%s); retrying", type(exc).__name__)
            self._stopping.wait(delay)

    def _maintain(self) -> None:
        """Periodic work: attestation refresh and taking over stalled requests."""
        try:
            self._publish_attestation()
        except Exception as exc:
            log.warning("publishing the attestation failed (%s)", type(exc).__name__)
        self._reclaim()

    def _read_loop(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            try:
                deliveries = self._reader_broker.read(self._settings.max_batch_size, 500)
                backoff.reset()
            except Exception as exc:  # connection trouble: retry, never die silently
                delay = backoff.next_delay()
                log.warning("reading requests failed (%s); retrying in %.1f s",
                            type(exc).__name__, delay)
                self._stopping.wait(delay)
                continue
            for delivery in deliveries:
                self._inbox.put(delivery)

    def _collect(self, timeout_s: float) -> list[Delivery]:
        try:
            batch = [self._inbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        # At low load (the last batch was a single request and nothing else is waiting) a
        # wait would only add latency; under load, requests queue up while the engine runs.
        delay_ms = self._settings.max_batch_delay_ms
        if self._single_items and self._inbox.empty():
            delay_ms = 0
        deadline = time.monotonic() + delay_ms / 1000
        while len(batch) < self._settings.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    batch.append(self._inbox.get_nowait())
                else:
                    batch.append(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        self._single_items = len(batch) == 1
        return batch

    def _reclaim(self) -> None:
        """Take over requests held by dead consumers at once, and by stuck ones after
        ``claim_idle_ms``; set aside those the retry policy gives up on."""
        try:
            claimed = self._broker.reclaim_dead(self._settings.dead_after_s,
                                                self._settings.max_batch_size)
            if len(claimed) < self._settings.max_batch_size:
                claimed += self._broker.reclaim(self._settings.claim_idle_ms,
                                                self._settings.max_batch_size - len(claimed))
        except Exception as exc:
            log.warning("reclaiming stalled requests failed (%s)", type(exc).__name__)
            return
        if not claimed:
            return
        log.info("reclaimed %d stalled request(s)", len(claimed))
        self.metrics.reclaimed.labels(*self._labels).inc(len(claimed))
        fresh = []
        for delivery in claimed:
            reason = self._retries.dead_letter_reason(delivery)
            if reason is None:
                fresh.append(delivery)
                continue
            log.error("request %s moved to the dead-letter stream: %s",
                      delivery.request_id, reason, extra={"request_id": delivery.request_id})
            self.metrics.dead_lettered.labels(*self._labels).inc()
            try:
                self._broker.dead_letter(
                    self._error_reply(delivery, ErrorKind.DEAD_LETTER,
                                      "the request failed repeatedly and was set aside"),
                    reason)
            except Exception as exc:  # still pending: the next scan tries again
                log.warning("dead-lettering failed (%s)", type(exc).__name__)
        if fresh:
            self.process(fresh)

    def _error_reply(self, delivery: Delivery, kind: ErrorKind, message: str) -> Reply:
        aad = associated_data(self._model, delivery.request_id, REPLY)
        return Reply(delivery, False, self._sealer.seal(error_body(kind, message), aad))

    def process(self, deliveries: list[Delivery]) -> None:
        """Answer every delivery: outputs for good items, an error for each bad one."""
        self._answer(self._infer(deliveries))

    def _infer(self, deliveries: list[Delivery]) -> list[_Work]:
        """Open, validate and run a batch (the part that needs the engine)."""
        now_ms = int(time.time() * 1000)
        expired = [d for d in deliveries if d.deadline_ms and d.deadline_ms < now_ms]
        if expired:
            self._broker.drop(expired)
        work = [_Work(d) for d in deliveries if d not in expired]
        batch_started = time.time_ns()
        for entry in work:
            entry.trace = context_of(entry.delivery.traceparent)
            if entry.delivery.enqueued_ms:
                entry.queue_s = max(0.0, batch_started / 1e9 - entry.delivery.enqueued_ms / 1000)
                self.metrics.queue_seconds.labels(*self._labels).observe(entry.queue_s)
                span_between("queue wait", entry.trace, entry.delivery.enqueued_ms * 1_000_000,
                             batch_started)
        opening = time.time_ns()
        try:
            fates = self._intake.open([entry.delivery for entry in work])
        except Exception as exc:  # never a failed batch: each record on its own instead
            log.warning("opening a batch at once failed (%s); opening its records one by one",
                        type(exc).__name__)
            fates = [None] * len(work)
        for entry, fate in zip(work, fates, strict=True):
            try:
                entry.item = self._item(entry, fate)
            except (IntegrityError, InvalidInput, ProtocolError, EngineError) as exc:
                if isinstance(exc, IntegrityError):
                    log.warning("request %s refused: record failed authentication",
                                entry.delivery.request_id,
                                extra={"request_id": entry.delivery.request_id})
                entry.error = exc
            except Exception as exc:  # a record no check foresaw: its own error, never a crash
                log.warning("request %s refused: unreadable record (%s)",
                            entry.delivery.request_id, type(exc).__name__,
                            extra={"request_id": entry.delivery.request_id})
                entry.error = ProtocolError("the request record is malformed")
            span_between("open", entry.trace, opening, time.time_ns(),
                         bytes=len(entry.delivery.body))
        items = [entry.item for entry in work if entry.item is not None]
        started = time.perf_counter()
        engine_started = time.time_ns()
        try:
            run_batched(items, self._engine.infer, self._settings.max_batch_size * 64)
        except Exception as exc:  # the batch fails as a whole; the worker carries on
            log.error("a batch of %d failed (%s)", len(items), type(exc).__name__)
            for item in items:
                if item.outputs is None:
                    item.error = EngineError("the engine failed on this batch")
        if items:
            engine_s = time.perf_counter() - started
            self.metrics.engine_seconds.labels(*self._labels).observe(engine_s)
            self.metrics.batch_size.labels(*self._labels).observe(len(items))
            engine_ended = time.time_ns()
            for entry in work:
                entry.engine_s = engine_s
                span_between("batch", entry.trace, batch_started, engine_ended,
                             batch_size=len(items))
                span_between("infer", entry.trace, engine_started, engine_ended,
                             batch_size=len(items))
        return work

    def _item(self, entry: _Work, fate: Fate) -> Item:
        """The item the intake made, or the one this record makes on its own."""
        if isinstance(fate, Item):
            return fate
        if isinstance(fate, Exception):
            raise fate
        if isinstance(fate, bytes):  # opened, but not in the stacked layout: say why
            return Item(self._checked(fate))
        return Item(self._open(entry))

    def _open(self, entry: _Work) -> dict[str, Any]:
        delivery = entry.delivery
        if delivery.payload_file and not delivery.body:
            # a deployment problem the operator must see, logged where its cause is known
            log.warning("request %s failed: its payload is not readable in the payload spool",
                        delivery.request_id, extra={"request_id": delivery.request_id})
            raise EngineError("the request's payload could not be read from this worker's "
                              "payload spool (gateway and worker must share "
                              "redis.payload_spool on one host)")
        opened = self._sealer.open(delivery.body,
                                   associated_data(self._model, delivery.request_id, REQUEST))
        if delivery.mode is Mode.SEALED:
            if self._worker_key is None:
                raise IntegrityError("this worker holds no end-to-end key")
            sealed = self._worker_key.open_request(opened, self._name)
            # the same blob again within its window, through any gateway to any worker: a
            # replay (a redelivery of the same request carries the same request id)
            if not self._broker.remember_once(sealed.replay_id, delivery.request_id,
                                              int(E2E_WINDOW_S * 2000)):
                raise InvalidInput("this sealed request was already received: a replayed "
                                   "request is not answered again (seal each request anew)")
            opened, entry.reply_key = sealed.plaintext, sealed.reply_key
        return self._checked(opened)

    def _checked(self, opened: bytes) -> dict[str, Any]:
        """An opened record's inputs, checked against the model's (readable errors)."""
        _, inputs = record.unpack(opened)
        self._engine.spec.check_inputs(inputs, self._settings.max_rows_per_request)
        return inputs

    def _answer(self, work: list[_Work]) -> None:
        """Seal the answers, post them and ack (the part that needs no engine)."""
        replies = [self._reply(entry) for entry in work]
        self._post(replies)
        for reply in replies:
            self.metrics.items.labels(*self._labels, "ok" if reply.ok else "error").inc()
        self.batches_served += 1

    def _post(self, replies: list[Reply]) -> None:
        """Post through a Redis outage while any caller may still be waiting; after that the
        requests stay pending and are reclaimed (or dropped as expired) later."""
        backoff = Backoff(0.05, 2.0)
        last_deadline_s = max((r.delivery.deadline_ms for r in replies), default=0) / 1000
        while True:
            try:
                answered = self._broker.finish(replies)
            except Exception as exc:
                if time.time() > last_deadline_s or self._stopping.is_set():
                    log.warning("posting %d answer(s) failed (%s); left pending",
                                len(replies), type(exc).__name__)
                    return
                self._stopping.wait(backoff.next_delay())
                continue
            if answered < len(replies):
                log.info("%d answer(s) dropped: taken over by another worker",
                         len(replies) - answered)
            return

    def _reply(self, entry: _Work) -> Reply:
        error = entry.error or (entry.item.error if entry.item else None)
        if error is not None or entry.item is None or entry.item.outputs is None:
            return self._error_reply(entry.delivery, ErrorKind.of(error),
                                     str(error or "no output"))
        sealing = time.time_ns()
        aad = associated_data(self._model, entry.delivery.request_id, REPLY)
        packed = record.pack(entry.item.outputs)
        if entry.reply_key is not None:
            packed = WorkerKey.seal_reply(entry.reply_key, packed, self._name)
        body = self._sealer.seal(packed, aad)
        span_between("seal", entry.trace, sealing, time.time_ns(), bytes=len(body))
        return Reply(entry.delivery, True, body, entry.item.batch_size, entry.queue_s,
                     entry.engine_s)

