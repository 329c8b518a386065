"""What the gateway does with a request, free of HTTP: validate, seal, enqueue, await, open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppml_serve.backoff import Backoff
from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import ModelSpec, TooManyRows
from ppml_serve.codecs.v2 import InferRequest, check_outputs, encode_response, parse_request
from ppml_serve.crypto.envelope import REPLY, REQUEST, Sealer, associated_data
from ppml_serve.errors import (
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
)
from ppml_serve.logs import request_id as current_request
from ppml_serve.queue.contract import (
    GatewayBroker,
    Job,
    JobState,
    Mode,
    QueueStats,
    ReplyMessage,
    parse_error,
)
from ppml_serve.settings import GatewaySettings
from ppml_serve.tracing import current_traceparent, tracer

log = logging.getLogger("ppml_serve.gateway")

WATCH_INTERVAL_S = 0.5
"""How often waiting requests are checked against the live workers of their model."""


@dataclass
class _Cached:
    value: Any
    expires: float


@dataclass
class _Waiter:
    model: str
    future: asyncio.Future[ReplyMessage]


class DataPlane:
    """One per gateway process; owns the reply reader and the table of waiting requests."""

    def __init__(self, broker: GatewayBroker, sealer: Sealer, settings: GatewaySettings,
                 worker_max_age_s: float,
                 on_reply: Callable[[str, ReplyMessage], None] | None = None,
                 configured_models: set[str] | None = None,
                 max_rows: int | None = None) -> None:
        self._broker = broker
        self._sealer = sealer
        self._settings = settings
        self._worker_max_age_s = worker_max_age_s
        self._waiting: dict[str, _Waiter] = {}
        self._inflight: Counter[str] = Counter()
        self._cache: dict[str, _Cached] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._on_reply = on_reply
        self._configured = configured_models or set()
        self._max_rows = max_rows

    async def start(self) -> None:
        """Start even while Redis is down: readiness reports it, requests get 503."""
        try:
            await self._broker.ping()
        except NotReady as exc:
            log.warning("starting without the queue (%s); will keep trying", exc)
        self._tasks = [asyncio.create_task(self._watch_workers(), name="worker-watch")]

    def _ensure_reader(self, model: str) -> None:
        """One reply reader per model (its reply stream shares the model's Redis Cluster
        slot), started with the first request for that model."""
        if model not in self._readers:
            self._readers[model] = asyncio.create_task(self._read_replies(model),
                                                       name=f"replies {model}")

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._readers.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_waiting(NotReady("the gateway is shutting down"))
        await self._broker.close()

    def inflight(self) -> dict[str, int]:
        """Requests waiting for their answer here, by model."""
        return dict(self._inflight)

    async def queue_stats(self) -> dict[str, QueueStats]:
        """Queue depth, lag, pending and live workers of every served model."""
        models = set(self._configured)
        cached = self._cache.get("models")
        if cached is not None:
            models |= set(cached.value)
        return {model: await self._broker.queue_stats(model, self._worker_max_age_s)
                for model in sorted(models)}

    def _fail_waiting(self, error: Exception, model: str | None = None) -> None:
        for waiter in list(self._waiting.values()):
            if (model is None or waiter.model == model) and not waiter.future.done():
                waiter.future.set_exception(error)

    async def _read_replies(self, model: str) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                messages = await self._broker.read_replies(model, block_ms=1000)
            except NotReady as exc:
                # Answers in transit on a lost connection may never arrive: fail fast (503)
                # rather than let callers wait for their deadline.
                if any(waiter.model == model for waiter in self._waiting.values()):
                    log.warning("lost the queue (%s): failing model %r's waiting requests",
                                exc, model)
                self._fail_waiting(NotReady("the connection to the queue was lost while "
                                            "waiting for the answer; retry"), model)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            for message in messages:
                waiter = self._waiting.get(message.request_id)
                if waiter is None or waiter.future.done():
                    continue  # its caller gave up, or it was failed already
                waiter.future.set_result(message)
                if self._on_reply is not None and message.ok:
                    self._on_reply(waiter.model, message)

    async def _watch_workers(self) -> None:
        """Requests for a model whose last worker died get 503 now, not 504 later (if a new
        worker comes up in time, it answers them instead)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for model in {waiter.model for waiter in self._waiting.values()}:
                try:
                    live = await self._broker.live_workers(model, self._worker_max_age_s)
                except NotReady:
                    continue  # the reply reader handles a lost queue
                self._cache[f"ready:{model}"] = _Cached(live > 0,
                                                        time.monotonic() + WATCH_INTERVAL_S)
                if live == 0:
                    log.warning("model %r has no live worker: failing its waiting requests",
                                model)
                    self._fail_waiting(NotReady(f"model {model!r} has no live worker"), model)

    async def _cached(self, key: str, ttl_s: float, load: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is None or entry.expires < now:
            entry = _Cached(await load(), now + ttl_s)
            self._cache[key] = entry
        return entry.value

    async def models(self, refresh: bool = False) -> dict[str, ModelSpec]:
        if refresh:
            self._cache.pop("models", None)

        async def load() -> dict[str, ModelSpec]:
            table = await self._broker.models()
            return {name: ModelSpec.from_json(json.loads(spec)) for name, spec in table.items()}

        result: dict[str, ModelSpec] = await self._cached("models", 2.0, load)
        return result

    def is_served(self, model: str) -> bool:
        """Whether ``model`` is configured here or was announced by a worker (no I/O)."""
        cached = self._cache.get("models")
        return model in self._configured or (cached is not None and model in cached.value)

    async def spec(self, model: str) -> ModelSpec:
        models = await self.models()
        if model not in models:
            models = await self.models(refresh=True)
        if model not in models:
            if model in self._configured:
                raise NotReady(f"model {model!r} has no worker that holds its keys")
            raise ModelNotFound(f"model {model!r} is not served here")
        return models[model]

    def versions(self, model: str) -> list[str]:
        """Versions of a model: one ("1") until models come from a versioned repository."""
        return ["1"]

    def check_version(self, model: str, version: str) -> None:
        if version not in self.versions(model):
            raise ModelNotFound(f"model {model!r} has no version {version!r} "
                                f"(versions: {', '.join(self.versions(model))})")

    async def model_config(self, model: str) -> dict[str, Any]:
        """The model's configuration in Triton's shape (``get_model_config``)."""
        spec = await self.spec(model)

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": f"TYPE_{t.datatype}",
                     "dims": list(t.shape[1:] if t.shape and t.shape[0] == -1 else t.shape)}
                    for t in specs]

        return {"name": spec.name, "platform": f"{spec.platform}_onnx"
                if spec.platform == "onnxruntime" else spec.platform,
                "backend": spec.platform, "max_batch_size": self._max_rows or 0,
                "input": tensors(spec.inputs), "output": tensors(spec.outputs),
                "version_policy": {"specific": {"versions": [1]}},
                "dynamic_batching": {}}

    async def repository_index(self) -> list[dict[str, str]]:
        """Every model this gateway serves or knows of, with its state (repository API)."""
        models = set(self._configured) | set(await self.models(refresh=True))
        index = []
        for model in sorted(models):
            try:
                ready = await self.model_ready(model)
            except (ModelNotFound, NotReady):
                ready = False
            index.append({"name": model, "version": "1",
                          "state": "READY" if ready else "UNAVAILABLE"})
        return index

    async def model_ready(self, model: str) -> bool:
        await self.spec(model)

        async def load() -> bool:
            return await self._broker.live_workers(model, self._worker_max_age_s) > 0

        ready: bool = await self._cached(f"ready:{model}", 0.5, load)
        return ready

    async def ready(self) -> bool:
        try:
            await self._broker.ping()
            models = await self.models()
            if self._configured - set(models):
                return False
            return bool(models) and all([await self.model_ready(name) for name in models])
        except NotReady:
            return False

    async def _check_backlog(self, model: str) -> None:
        backlog: int = await self._cached(f"backlog:{model}", 0.1,
                                          lambda: self._broker.backlog(model))
        if backlog >= self._settings.max_queue_length:
            raise Overloaded(f"model {model!r} has {backlog} queued requests; retry later")

    async def _admit(self, model: str, body: bytes, header_length: str | None) -> InferRequest:
        """Decode and validate a request against the model, then check it can be served."""
        with tracer().start_as_current_span("admit", attributes={"bytes": len(body)}):
            spec = await self.spec(model)
            return await self._admit_decoded(model, spec, parse_request(body, header_length))

    async def _admit_decoded(self, model: str, spec: ModelSpec,
                             request: InferRequest) -> InferRequest:
        try:
            spec.check_inputs(request.inputs, self._max_rows)
        except TooManyRows as exc:
            raise PayloadTooLarge(str(exc)) from None
        check_outputs(request, spec)
        await self._check_serving(model)
        return request

    async def _check_serving(self, model: str) -> None:
        if not await self.model_ready(model):
            raise NotReady(f"model {model!r} has no live worker")
        await self._check_backlog(model)

    @contextlib.asynccontextmanager
    async def _admission(self, model: str) -> AsyncIterator[None]:
        """Bound the requests held at once, per gateway and per model: beyond, 429 at once."""
        if len(self._waiting) >= self._settings.max_inflight:
            raise Overloaded(f"this gateway holds {len(self._waiting)} requests; retry later")
        if self._inflight[model] >= self._settings.max_inflight_per_model:
            raise Overloaded(f"model {model!r} has {self._inflight[model]} requests in flight "
                             "here; retry later")
        self._inflight[model] += 1
        try:
            yield
        finally:
            self._inflight[model] -= 1
            if not self._inflight[model]:
                del self._inflight[model]

    async def infer(self, model: str, body: bytes,
                    header_length: str | None) -> tuple[bytes, int | None]:
        async with self._admission(model):
            request = await self._admit(model, body, header_length)
            outputs = await self._round_trip(model, request)
        return encode_response(model, request, outputs)

    async def infer_decoded(self, model: str, request: InferRequest
                            ) -> dict[str, np.ndarray[Any, Any]]:
        """The same path for a request another front end (gRPC) has decoded already; returns
        the requested outputs (all when ``request.outputs`` is ``None``)."""
        async with self._admission(model):
            with tracer().start_as_current_span("admit"):
                spec = await self.spec(model)
                request = await self._admit_decoded(model, spec, request)
            outputs = await self._round_trip(model, request)
        if request.outputs is None:
            return outputs
        return {name: outputs[name] for name in request.outputs}

    async def attestations(self, model: str) -> list[dict[str, Any]]:
        await self.spec(model)
        return [json.loads(item) for item in await self._broker.attestations(model)]

    async def infer_sealed(self, model: str, blob: bytes) -> bytes:
        """End-to-end mode: ``blob`` is sealed by the client to the workers' key; the gateway
        only wraps it for the queue and hands back the equally opaque answer."""
        async with self._admission(model):
            await self.spec(model)
            await self._check_serving(model)
            try:
                return await self._exchange(model, blob, mode=Mode.SEALED)
            except (IntegrityError, ProtocolError):
                # The worker could not open what the client sealed: the client's input.
                raise InvalidInput("the sealed request could not be opened by the model's "
                                   "workers (not sealed to their attested key, or damaged)"
                                   ) from None

    async def _round_trip(self, model: str, request: InferRequest) -> dict[str, Any]:
        plaintext = await self._exchange(model, record.pack(request.inputs))
        _, outputs = record.unpack(plaintext)
        return outputs

    async def _exchange(self, model: str, payload: bytes, mode: Mode = Mode.STANDARD) -> bytes:
        request_id = current_request.get() or uuid.uuid4().hex  # one id in logs and queue
        message = await self._send(model, request_id, payload, mode,
                                   self._settings.request_timeout_s)
        return self._open_reply(model, request_id, message.ok, message.body)

    def _open_reply(self, model: str, request_id: str, ok: bool, body: bytes) -> bytes:
        try:
            plaintext = self._sealer.open(body, associated_data(model, request_id, REPLY))
        except IntegrityError:
            log.error("reply for request %s refused: record failed authentication", request_id)
            raise
        if not ok:
            raise parse_error(plaintext)
        return plaintext

    async def _send(self, model: str, request_id: str, payload: bytes, mode: Mode,
                    timeout: float) -> ReplyMessage:
        """Seal, enqueue and wait for the (still sealed) answer."""
        spans = tracer()
        with spans.start_as_current_span("seal", attributes={"bytes": len(payload)}):
            sealed = self._sealer.seal(payload, associated_data(model, request_id, REQUEST))
        future: asyncio.Future[ReplyMessage] = asyncio.get_running_loop().create_future()
        self._ensure_reader(model)
        self._waiting[request_id] = _Waiter(model, future)
        try:
            with spans.start_as_current_span("enqueue"):
                # The worker's spans continue from here: the context rides in the record's
                # clear header, never in the sealed payload.
                await self._broker.enqueue(model, request_id, sealed,
                                           int((time.time() + timeout) * 1000), mode,
                                           traceparent=current_traceparent())
            with spans.start_as_current_span("wait"):
                message = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no answer from model {model!r} within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
        return message

    # Jobs: enqueue now, fetch the answer later (from any gateway) by id. The worker stores the
    # answer in the job record exactly as it sealed it, so no gateway needs to stay up for it.

    async def submit(self, model: str, body: bytes, header_length: str | None,
                     owner: str) -> str:
        request = await self._admit(model, body, header_length)
        job_id = uuid.uuid4().hex
        ttl = self._settings.job_ttl_s
        await self._broker.save_job(job_id, Job(model, owner, request.outputs,
                                                request.binary_default), ttl)
        sealed = self._sealer.seal(record.pack(request.inputs),
                                   associated_data(model, job_id, REQUEST))
        deadline_ms = int((time.time() + self._settings.job_timeout_s) * 1000)
        await self._broker.enqueue(model, job_id, sealed, deadline_ms, job_ttl_s=ttl)
        return job_id

    async def job_result(self, model: str, job_id: str,
                         owner: str) -> tuple[bytes, int | None] | None:
        """The answer, ``None`` while pending; unknown, expired or foreign jobs are 404."""
        job = await self._broker.load_job(model, job_id)
        if job is None or job.model != model or job.owner != owner:
            raise ModelNotFound(f"no job {job_id!r} for model {model!r} (unknown or expired)")
        if job.state is JobState.PENDING:
            return None
        if job.state is JobState.FAILED:
            raise DeadlineExceeded(job.error or "the job failed")
        plaintext = self._open_reply(model, job_id, job.ok, job.body)
        _, outputs = record.unpack(plaintext)
        request = InferRequest(job_id, {}, job.outputs, job.binary)
        return encode_response(model, request, outputs)
