"""What the gateway does with a request, free of HTTP: validate, seal, enqueue, await, open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import ModelSpec
from ppml_serve.codecs.v2 import InferRequest, check_outputs, encode_response, parse_request
from ppml_serve.crypto.envelope import REPLY, REQUEST, Sealer, associated_data
from ppml_serve.errors import (
    DeadlineExceeded,
    EngineError,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PPMLError,
    ProtocolError,
)
from ppml_serve.queue.broker import ReplyMessage
from ppml_serve.queue.redis_streams import RedisGatewayBroker
from ppml_serve.settings import GatewaySettings

log = logging.getLogger("ppml_serve.gateway")

_WORKER_ERRORS: dict[str, type[Exception]] = {
    "invalid_input": InvalidInput,
    "integrity": IntegrityError,
    "protocol": ProtocolError,
    "engine": EngineError,
    "dead_letter": EngineError,
}


@dataclass
class _Cached:
    value: Any
    expires: float


class DataPlane:
    """One per gateway process; owns the reply reader and the table of waiting requests."""

    def __init__(self, broker: RedisGatewayBroker, sealer: Sealer, settings: GatewaySettings,
                 worker_max_age_s: float, on_batch: Callable[[int], None] | None = None,
                 configured_models: set[str] | None = None) -> None:
        self._broker = broker
        self._sealer = sealer
        self._settings = settings
        self._worker_max_age_s = worker_max_age_s
        self._waiting: dict[str, asyncio.Future[ReplyMessage]] = {}
        self._cache: dict[str, _Cached] = {}
        self._reader: asyncio.Task[None] | None = None
        self._on_batch = on_batch
        self._configured = configured_models or set()
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._broker.ping()
        self._reader = asyncio.create_task(self._read_replies(), name="reply-reader")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(NotReady("gateway is shutting down"))
        await self._broker.close()

    async def _read_replies(self) -> None:
        while True:
            try:
                messages = await self._broker.read_replies(block_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading replies failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                future = self._waiting.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)
                if self._on_batch is not None and message.ok:
                    self._on_batch(message.batch_size)

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

    async def spec(self, model: str) -> ModelSpec:
        models = await self.models()
        if model not in models:
            models = await self.models(refresh=True)
        if model not in models:
            if model in self._configured:
                raise NotReady(f"model {model!r} has no worker that holds its keys")
            raise ModelNotFound(f"model {model!r} is not served here")
        return models[model]

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
        except NotReady:
            return False
        if self._configured - set(models):
            return False
        return bool(models) and all([await self.model_ready(name) for name in models])

    async def _check_backlog(self, model: str) -> None:
        backlog: int = await self._cached(f"backlog:{model}", 0.1,
                                          lambda: self._broker.backlog(model))
        if backlog >= self._settings.max_queue_length:
            raise Overloaded(f"model {model!r} has {backlog} queued requests; retry later")

    async def _admit(self, model: str, body: bytes, header_length: str | None) -> InferRequest:
        """Decode and validate a request against the model, then check it can be served."""
        spec = await self.spec(model)
        request = parse_request(body, header_length)
        spec.check_inputs(request.inputs)
        check_outputs(request, spec)
        await self._check_serving(model)
        return request

    async def _check_serving(self, model: str) -> None:
        if not await self.model_ready(model):
            raise NotReady(f"model {model!r} has no live worker")
        await self._check_backlog(model)

    async def infer(self, model: str, body: bytes,
                    header_length: str | None) -> tuple[bytes, int | None]:
        request = await self._admit(model, body, header_length)
        outputs = await self._round_trip(model, request)
        return encode_response(model, request, outputs)

    async def attestations(self, model: str) -> list[dict[str, Any]]:
        await self.spec(model)
        return [json.loads(item) for item in await self._broker.attestations(model)]

    async def infer_sealed(self, model: str, blob: bytes) -> bytes:
        """End-to-end mode: ``blob`` is sealed by the client to the workers' key; the gateway
        only wraps it for the queue and hands back the equally opaque answer."""
        await self.spec(model)
        await self._check_serving(model)
        return await self._exchange(model, blob, mode="e2e")

    async def _round_trip(self, model: str, request: InferRequest) -> dict[str, Any]:
        plaintext = await self._exchange(model, record.pack(request.inputs))
        _, outputs = record.unpack(plaintext)
        return outputs

    async def _exchange(self, model: str, payload: bytes, mode: str = "") -> bytes:
        request_id = uuid.uuid4().hex
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
            problem = json.loads(plaintext)
            raise _WORKER_ERRORS.get(problem.get("kind"), EngineError)(str(problem.get("error")))
        return plaintext

    async def _send(self, model: str, request_id: str, payload: bytes, mode: str,
                    timeout: float) -> ReplyMessage:
        """Seal, enqueue and wait for the (still sealed) answer."""
        sealed = self._sealer.seal(payload, associated_data(model, request_id, REQUEST))
        future: asyncio.Future[ReplyMessage] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._broker.enqueue(model, request_id, sealed,
                                       int((time.time() + timeout) * 1000), mode)
            message = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no answer from model {model!r} within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
        return message

    # Jobs: enqueue now, fetch the answer later (from any gateway) by id. The answer is kept
    # in Redis exactly as the worker sealed it, for ``job_ttl_s``.

    async def submit(self, model: str, body: bytes, header_length: str | None,
                     owner: str) -> str:
        request = await self._admit(model, body, header_length)
        job_id = uuid.uuid4().hex
        binary = "1" if request.binary_default else "0"
        await self._broker.save_job(job_id, {
            "state": "pending", "model": model, "owner": owner,
            "outputs": json.dumps(request.outputs), "binary": binary,
        }, self._settings.job_ttl_s)
        task = asyncio.create_task(self._complete_job(model, job_id, record.pack(request.inputs)))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return job_id

    async def _complete_job(self, model: str, job_id: str, payload: bytes) -> None:
        ttl = self._settings.job_ttl_s
        try:
            message = await self._send(model, job_id, payload, "", self._settings.job_timeout_s)
        except PPMLError as exc:
            await self._broker.save_job(job_id, {"state": "failed", "error": str(exc)}, ttl)
            return
        await self._broker.save_job(job_id, {"state": "done", "ok": "1" if message.ok else "0",
                                             "body": message.body}, ttl)

    async def job_result(self, model: str, job_id: str,
                         owner: str) -> tuple[bytes, int | None] | None:
        """The answer, ``None`` while pending; unknown, expired or foreign jobs are 404."""
        fields = await self._broker.load_job(job_id)
        if not fields or fields.get("model") != model or fields.get("owner") != owner:
            raise ModelNotFound(f"no job {job_id!r} for model {model!r} (unknown or expired)")
        if fields["state"] == "pending":
            return None
        if fields["state"] == "failed":
            raise DeadlineExceeded(str(fields.get("error", "the job failed")))
        plaintext = self._open_reply(model, job_id, fields.get("ok") == "1",
                                     fields["body"].encode("latin-1"))
        _, outputs = record.unpack(plaintext)
        request = InferRequest(job_id, {}, json.loads(fields["outputs"]),
                               fields.get("binary") == "1")
        return encode_response(model, request, outputs)
