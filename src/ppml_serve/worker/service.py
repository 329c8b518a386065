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
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.codecs import record
from ppml_serve.crypto.attestation.base import Provider, report_data
from ppml_serve.crypto.e2e import WorkerKey
from ppml_serve.crypto.envelope import REPLY, REQUEST, Sealer, associated_data
from ppml_serve.engines.base import Engine
from ppml_serve.errors import EngineError, IntegrityError, InvalidInput, ProtocolError
from ppml_serve.queue.broker import Delivery, Reply, WorkerBroker
from ppml_serve.settings import WorkerSettings
from ppml_serve.worker.batching import Item, run_batched
from ppml_serve.worker.metrics import WorkerMetrics

log = logging.getLogger("ppml_serve.worker")

_ERROR_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (IntegrityError, "integrity"),
    (InvalidInput, "invalid_input"),
    (ProtocolError, "protocol"),
    (EngineError, "engine"),
)


ATTESTATION_REFRESH_S = 30.0


@dataclass
class _Work:
    delivery: Delivery
    item: Item | None = None
    error: Exception | None = None
    reply_key: AESGCM | None = None


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"kind": kind, "error": message}).encode()


class Worker:
    """Serves one model from its request stream until ``stop`` is called."""

    def __init__(self, model: str, engine: Engine, broker: WorkerBroker,
                 reader_broker: WorkerBroker, sealer: Sealer,
                 settings: WorkerSettings, worker_key: WorkerKey | None = None,
                 provider: Provider | None = None, measurement: str = "") -> None:
        self._model = model
        self._engine = engine
        self._broker = broker
        self._reader_broker = reader_broker
        self._sealer = sealer
        self._settings = settings
        self._inbox: queue.Queue[Delivery] = queue.Queue(maxsize=settings.max_batch_size)
        self._stopping = threading.Event()
        self._worker_key = worker_key
        self._provider = provider
        self._measurement = measurement
        self._attested_at = 0.0
        self.batches_served = 0
        self.metrics = WorkerMetrics(model)
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
        evidence = self._provider.evidence(self._measurement, report_data(public, None), None)
        self._broker.publish_attestation(json.dumps({
            "provider": self._provider.name, "evidence": evidence,
            "public_key": base64.b64encode(public).decode(), "measurement": self._measurement}))
        self._attested_at = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()

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
        self._broker.ensure_group()
        self._broker.publish(json.dumps(self._engine.spec.as_json()))
        if self._settings.metrics_port is not None:
            self.metrics.serve(self._settings.metrics_port)
        reader = threading.Thread(target=self._read_loop, name="stream-reader", daemon=True)
        reader.start()
        log.info("worker serving model %r", self._model)
        next_beat = 0.0
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_beat:
                    self._broker.heartbeat()
                    self._publish_attestation()
                    self._reclaim()
                    next_beat = time.monotonic() + self._settings.heartbeat_s
                batch = self._collect(timeout_s=min(0.5, self._settings.heartbeat_s))
                if batch:
                    self._submit(batch)
            reader.join(timeout=5)
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._replier.shutdown(wait=True)
            leftovers: list[Delivery] = []
            while not self._inbox.empty():
                leftovers.append(self._inbox.get_nowait())
            if leftovers:
                self.process(leftovers)  # answer what was taken rather than wait for reclaim
        finally:
            self._broker.leave()
            log.info("worker for model %r stopped", self._model)

    def _read_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                deliveries = self._reader_broker.read(self._settings.max_batch_size, 500)
            except Exception as exc:  # connection trouble: retry, never die silently
                log.warning("reading requests failed (%s); retrying", type(exc).__name__)
                time.sleep(0.5)
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
        try:
            claimed = self._broker.reclaim(self._settings.claim_idle_ms,
                                           self._settings.max_batch_size)
        except Exception as exc:
            log.warning("reclaiming stalled requests failed (%s)", type(exc).__name__)
            return
        if not claimed:
            return
        log.info("reclaimed %d stalled request(s)", len(claimed))
        self.metrics.reclaimed.labels(self._model).inc(len(claimed))
        fresh = []
        for delivery in claimed:
            if delivery.deliveries > self._settings.max_deliveries:
                reason = f"delivered {delivery.deliveries} times without an answer"
                log.error("request %s moved to the dead-letter stream: %s",
                          delivery.request_id, reason)
                self.metrics.dead_lettered.labels(self._model).inc()
                self._broker.dead_letter(
                    self._error_reply(delivery, "dead_letter",
                                      "the request failed repeatedly and was set aside"),
                    reason)
            else:
                fresh.append(delivery)
        if fresh:
            self.process(fresh)

    def _error_reply(self, delivery: Delivery, kind: str, message: str) -> Reply:
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
        for entry in work:
            try:
                aad = associated_data(self._model, entry.delivery.request_id, REQUEST)
                opened = self._sealer.open(entry.delivery.body, aad)
                if entry.delivery.mode == "e2e":
                    if self._worker_key is None:
                        raise IntegrityError("this worker holds no end-to-end key")
                    opened, entry.reply_key = self._worker_key.open_request(opened, self._model)
                _, inputs = record.unpack(opened)
                self._engine.spec.check_inputs(inputs)
                entry.item = Item(inputs)
            except (IntegrityError, InvalidInput, ProtocolError) as exc:
                if isinstance(exc, IntegrityError):
                    log.warning("request %s refused: record failed authentication",
                                entry.delivery.request_id)
                entry.error = exc
        items = [entry.item for entry in work if entry.item is not None]
        started = time.perf_counter()
        run_batched(items, self._engine.infer, self._settings.max_batch_size * 64)
        if items:
            self.metrics.engine_seconds.labels(self._model).observe(
                time.perf_counter() - started)
            self.metrics.batch_size.labels(self._model).observe(len(items))
        return work

    def _answer(self, work: list[_Work]) -> None:
        """Seal the answers, post them and ack (the part that needs no engine)."""
        replies = [self._reply(entry) for entry in work]
        self._broker.finish(replies)
        for reply in replies:
            self.metrics.items.labels(self._model, "ok" if reply.ok else "error").inc()
        self.batches_served += 1

    def _reply(self, entry: _Work) -> Reply:
        error = entry.error or (entry.item.error if entry.item else None)
        if error is not None or entry.item is None or entry.item.outputs is None:
            kind = next((k for t, k in _ERROR_KINDS if isinstance(error, t)), "engine")
            return self._error_reply(entry.delivery, kind, str(error or "no output"))
        aad = associated_data(self._model, entry.delivery.request_id, REPLY)
        packed = record.pack(entry.item.outputs)
        if entry.reply_key is not None:
            packed = WorkerKey.seal_reply(entry.reply_key, packed, self._model)
        body = self._sealer.seal(packed, aad)
        return Reply(entry.delivery, True, body, entry.item.batch_size)

