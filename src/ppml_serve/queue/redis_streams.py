"""Redis Streams implementation of the broker; the only module that imports redis.

Key layout (PREFIX defaults to ``ppml``)::

    PREFIX:req:MODEL        stream of requests; consumer group "workers";
                            fields id, reply (reply stream key), body (sealed), deadline (ms)
    PREFIX:reply:GATEWAY    stream of answers for one gateway, trimmed to about MAXLEN;
                            fields id, ok ("1"/"0"), body (sealed), bs (batch size)
    PREFIX:dead:MODEL       dead-letter stream: the request's fields plus reason, deliveries
    PREFIX:models           hash MODEL -> model spec JSON (inputs/outputs), set by workers
    PREFIX:workers:MODEL    sorted set worker-id -> last heartbeat (unix seconds)
    PREFIX:attest:MODEL     hash worker-id -> attestation JSON (public key + evidence)
    PREFIX:job:ID           hash of a job: state, model, owner, output options, and the
                            answer as the worker sealed it; expires after job_ttl_s

Redis only ever sees sealed bodies; ids, stream names and specs are not secret.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from ppml_serve.errors import NotReady
from ppml_serve.queue.broker import Delivery, Reply, ReplyMessage

GROUP = "workers"
DEAD_LETTER_MAXLEN = 100_000


class Keys:
    """Names of every key ppml-serve uses."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def requests(self, model: str) -> str:
        return f"{self.prefix}:req:{model}"

    def replies(self, gateway_id: str) -> str:
        return f"{self.prefix}:reply:{gateway_id}"

    def dead_letters(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    def attestations(self, model: str) -> str:
        return f"{self.prefix}:attest:{model}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"


def _connection_options(url: SecretStr, ca_file: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {"health_check_interval": 30}
    if url.get_secret_value().startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                       ssl_ca_certs=str(ca_file) if ca_file else None)
    return options


def connect(url: SecretStr, ca_file: Path | None, **extra: Any) -> redis.Redis:
    """A synchronous client; credentials stay inside the connection pool."""
    return redis.Redis.from_url(url.get_secret_value(), **_connection_options(url, ca_file),
                                **extra)


def connect_async(url: SecretStr, ca_file: Path | None, **extra: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(url.get_secret_value(), **_connection_options(url, ca_file),
                                   **extra)


def _str(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _delivery(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1) -> Delivery:
    return Delivery(
        entry_id=_str(entry_id),
        request_id=_str(fields.get(b"id", b"")),
        reply_to=_str(fields.get(b"reply", b"")),
        body=fields.get(b"body", b""),
        deadline_ms=int(fields.get(b"deadline", b"0") or 0),
        deliveries=deliveries,
        mode=_str(fields.get(b"mode", b"")),
    )


class RedisWorkerBroker:
    """A worker's connection to one model's request stream (synchronous, thread-safe)."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str, consumer: str,
                 reply_maxlen: int = 10_000) -> None:
        self._client = client
        self._keys = keys
        self._model = model
        self._stream = keys.requests(model)
        self._consumer = consumer
        self._reply_maxlen = reply_maxlen

    def ensure_group(self) -> None:
        try:
            self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def publish(self, spec_json: str) -> None:
        """Announce the model's spec and this worker's liveness."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(self._keys.models, self._model, spec_json)
        pipe.zadd(self._keys.workers(self._model), {self._consumer: time.time()})
        pipe.execute()

    def heartbeat(self) -> None:
        self._client.zadd(self._keys.workers(self._model), {self._consumer: time.time()})

    def publish_attestation(self, document: str) -> None:
        self._client.hset(self._keys.attestations(self._model), self._consumer, document)

    def leave(self) -> None:
        # If Redis is already gone, the heartbeat entry simply ages out.
        with contextlib.suppress(redis.RedisError, OSError):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.workers(self._model), self._consumer)
            pipe.hdel(self._keys.attestations(self._model), self._consumer)
            pipe.execute()

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        response: Any = self._client.xreadgroup(GROUP, self._consumer, {self._stream: ">"},
                                           count=count, block=block_ms)
        if not response:
            return []
        _, entries = response[0]
        return [_delivery(entry_id, fields) for entry_id, fields in entries if fields]

    def finish(self, replies: Sequence[Reply]) -> None:
        if not replies:
            return
        pipe = self._client.pipeline(transaction=False)
        for reply in replies:
            pipe.xadd(
                reply.delivery.reply_to,
                {"id": reply.delivery.request_id, "ok": "1" if reply.ok else "0",
                 "body": reply.body, "bs": str(reply.batch_size)},
                maxlen=self._reply_maxlen, approximate=True,
            )
        ids = [reply.delivery.entry_id for reply in replies]
        pipe.xack(self._stream, GROUP, *ids)
        pipe.xdel(self._stream, *ids)
        pipe.execute()

    def drop(self, deliveries: Sequence[Delivery]) -> None:
        """Ack and delete requests that need no answer (their caller gave up)."""
        if deliveries:
            ids = [delivery.entry_id for delivery in deliveries]
            pipe = self._client.pipeline(transaction=False)
            pipe.xack(self._stream, GROUP, *ids)
            pipe.xdel(self._stream, *ids)
            pipe.execute()

    def reclaim(self, min_idle_ms: int, count: int) -> list[Delivery]:
        response: Any = self._client.xautoclaim(self._stream, GROUP, self._consumer,
                                           min_idle_time=min_idle_ms, start_id="0-0",
                                           count=count)
        entries = [(entry_id, fields) for entry_id, fields in response[1] if fields]
        if not entries:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self._stream, GROUP, min=entry_id, max=entry_id, count=1)
        counts = []
        pending: Any
        for pending in pipe.execute():
            counts.append(int(pending[0]["times_delivered"]) if pending else 1)
        return [_delivery(entry_id, fields, deliveries)
                for (entry_id, fields), deliveries in zip(entries, counts, strict=True)]

    def dead_letter(self, reply: Reply, reason: str) -> None:
        delivery = reply.delivery
        self._client.xadd(
            self._keys.dead_letters(self._model),
            {"id": delivery.request_id, "reply": delivery.reply_to, "body": delivery.body,
             "deadline": str(delivery.deadline_ms), "mode": delivery.mode, "reason": reason,
             "deliveries": str(delivery.deliveries)},
            maxlen=DEAD_LETTER_MAXLEN, approximate=True,
        )
        self.finish([reply])


class RedisGatewayBroker:
    """A gateway's side of the queue (asyncio)."""

    def __init__(self, client: aioredis.Redis, reader: aioredis.Redis, keys: Keys,
                 gateway_id: str) -> None:
        self._client = client
        self._reader = reader
        self._keys = keys
        self.reply_stream = keys.replies(gateway_id)
        # Each gateway run has a fresh, random reply stream, so reading from the start is safe.
        self._last_reply_id: bytes | str = b"0-0"

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (redis.RedisError, OSError) as exc:
            raise NotReady(f"queue unreachable: {type(exc).__name__}") from None

    async def close(self) -> None:
        try:
            await self._client.delete(self.reply_stream)
        except (redis.RedisError, OSError):
            pass  # Redis already gone: the stream is left to its MAXLEN
        finally:
            await self._client.aclose()
            await self._reader.aclose()

    async def enqueue(self, model: str, request_id: str, body: bytes, deadline_ms: int,
                      mode: str = "") -> None:
        fields: dict[Any, Any] = {"id": request_id, "reply": self.reply_stream, "body": body,
                  "deadline": str(deadline_ms)}
        if mode:
            fields["mode"] = mode
        try:
            await self._client.xadd(self._keys.requests(model), fields)
        except redis.ResponseError as exc:
            # Redis at maxmemory with noeviction refuses writes: overloaded, nothing dropped.
            raise NotReady(f"queue refused the request: {str(exc).split(' ', 1)[0]}") from None
        except (redis.RedisError, OSError) as exc:
            raise NotReady(f"queue unreachable: {type(exc).__name__}") from None

    async def backlog(self, model: str) -> int:
        return int(await self._client.xlen(self._keys.requests(model)))

    async def models(self) -> dict[str, str]:
        table: Any = await self._client.hgetall(self._keys.models)
        return {_str(name): spec.decode() for name, spec in table.items()}

    async def save_job(self, job_id: str, fields: dict[str, str | bytes], ttl_s: int) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._keys.job(job_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self._keys.job(job_id), ttl_s)
        await pipe.execute()

    async def load_job(self, job_id: str) -> dict[str, str]:
        table: Any = await self._client.hgetall(self._keys.job(job_id))
        # latin-1 maps bytes 1:1, so the sealed answer survives as text
        return {key.decode(): value.decode("latin-1") for key, value in table.items()}

    async def attestations(self, model: str) -> list[str]:
        table: Any = await self._client.hgetall(self._keys.attestations(model))
        return [value.decode() for value in table.values()]

    async def live_workers(self, model: str, max_age_s: float) -> int:
        return int(await self._client.zcount(self._keys.workers(model),
                                             time.time() - max_age_s, "+inf"))

    async def read_replies(self, block_ms: int, count: int = 512) -> list[ReplyMessage]:
        response: Any = await self._reader.xread({self.reply_stream: self._last_reply_id},
                                            count=count, block=block_ms)
        messages: list[ReplyMessage] = []
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._last_reply_id = entry_id
                request_id = _str(fields.get(b"id", b""))
                if request_id:
                    messages.append(ReplyMessage(request_id, fields.get(b"ok") == b"1",
                                                 fields.get(b"body", b""),
                                                 int(fields.get(b"bs", b"1") or 1)))
        return messages


def ping_sync(url: SecretStr, ca_file: Path | None) -> None:
    """Raise ``NotReady`` unless the Redis at ``url`` answers over its (TLS) connection."""
    client = connect(url, ca_file, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise NotReady(f"redis not reachable: {type(exc).__name__}") from None
    finally:
        client.close()
