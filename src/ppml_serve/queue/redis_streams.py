"""Redis Streams implementation of the queue contract; with its lean connections
(``redis_lane.py``) the only modules that import redis.

Key layout (PREFIX defaults to ``ppml``). Everything about one model carries the hash tag
``{MODEL}``, so that on a Redis Cluster a model's keys share one slot (one shard), and each
Lua script touches keys of one slot only. ``{MODEL}`` below stands for ``{NAME}`` for
version 1 of a model and ``{NAME}:vN`` for version N > 1 (the queue name ``NAME@N``); jobs
are keyed by the model's name alone, so ``…/jobs/ID`` finds a job whatever its version::

    PREFIX:{MODEL}:req      stream of requests; consumer group "workers"; fields id,
                            reply (reply stream key, empty for a job), body (sealed),
                            deadline (unix ms), mode ("" or "e2e"), job (TTL s, jobs only),
                            tp (W3C traceparent, when tracing)
    PREFIX:{MODEL}:reply:GATEWAY
                            stream of answers for one gateway, trimmed to about MAXLEN and
                            expiring an hour after its last answer (a dead gateway's stream
                            goes away); fields id, ok ("1"/"0"), body (sealed), bs (batch
                            size), qw / et (queue wait / engine time, ms)
    PREFIX:{MODEL}:dead     dead-letter stream: the request's fields plus reason, deliveries
    PREFIX:{MODEL}:workers  sorted set worker-id -> last heartbeat (unix seconds)
    PREFIX:{MODEL}:attest   hash worker-id -> attestation JSON (public key + evidence)
    PREFIX:{MODEL}:job:ID   hash of a job: state, model, owner, output options, and the
                            answer as the worker sealed it; expires after the job TTL
    PREFIX:models           hash queue name -> model spec JSON (inputs, outputs, labels),
                            sealed like a payload (associated data: queue name, "spec")
    PREFIX:repository       hash model name -> what an administrator asked (load/unload)
    PREFIX:hosts            hash worker-process id -> its repository view and versions'
                            states (JSON with the time it was written; stale ones ignored)

Redis only ever sees sealed bodies and specs; ids, stream names, model names and states are
not secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from ppml_serve.errors import NotReady, QueueStalled
from ppml_serve.queue.contract import (
    Delivery,
    HostStatus,
    Job,
    JobState,
    Mode,
    ModelState,
    QueueStats,
    Reply,
    ReplyMessage,
)
from ppml_serve.queue.liveness import StallWatch
from ppml_serve.queue.redis_lane import BlockingRedisLane, RedisLane
from ppml_serve.queue.spool import PayloadSpool

log = logging.getLogger("ppml_serve.queue")

GROUP = "workers"
_ANSWERS = (redis.ResponseError,)
"""Errors that are Redis's answer (not its silence): they end a stall."""
DEAD_LETTER_MAXLEN = 100_000
REPLY_STREAM_TTL_S = 3600

# Post answers, ack and delete, atomically and only for entries still pending on this
# consumer: a worker that froze and lost its requests to another must not answer them too.
# KEYS[1] request stream, KEYS[2..] reply stream or job key per answer.
# ARGV: group, consumer, reply maxlen, reply TTL, then per answer: entry id, request id, ok,
#       body, batch size, job TTL (0: to the reply stream; -1: nowhere to answer, ack only),
#       queue wait (ms), engine time (ms).
# allow-oom: at maxmemory Redis refuses new requests (the gateway answers 503), but the
# answers to those it holds must still get out; they are bounded by the requests in flight.
_FINISH = """#!lua flags=allow-oom
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local maxlen, reply_ttl = ARGV[3], ARGV[4]
local answered = 0
for i = 2, #KEYS do
  local a = 5 + (i - 2) * 8
  local entry = ARGV[a]
  if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 1 then
    local job_ttl = tonumber(ARGV[a + 5])
    if job_ttl < 0 then
      -- a request that named no valid place for its answer: nothing to post
    elseif job_ttl > 0 then
      if redis.call('EXISTS', KEYS[i]) == 1 then
        redis.call('HSET', KEYS[i], 'state', 'done', 'ok', ARGV[a + 2], 'body', ARGV[a + 3])
        redis.call('EXPIRE', KEYS[i], job_ttl)
      end
    else
      redis.call('XADD', KEYS[i], 'MAXLEN', '~', maxlen, '*', 'id', ARGV[a + 1],
                 'ok', ARGV[a + 2], 'body', ARGV[a + 3], 'bs', ARGV[a + 4],
                 'qw', ARGV[a + 6], 'et', ARGV[a + 7])
      redis.call('EXPIRE', KEYS[i], reply_ttl)
    end
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    answered = answered + 1
  end
end
return answered
"""

# the name Redis gives a script (SHA-1 of its text), not a security measure
_FINISH_SHA = hashlib.sha1(_FINISH.encode(), usedforsecurity=False).hexdigest()

# A worker's heartbeat, let through at maxmemory too (a full Redis is not a dead worker).
_HEARTBEAT = """#!lua flags=allow-oom
return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
"""

# Remove a consumer from the group only if it holds nothing: DELCONSUMER would otherwise
# destroy its pending entries. KEYS[1] stream, KEYS[2] worker heartbeats, KEYS[3] attestations.
_FORGET_CONSUMER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"""


class Keys:
    """Names of every key ppml-serve uses (see the layout above)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _of(self, model: str) -> str:
        name, _, version = model.partition("@")
        return f"{self.prefix}:{{{name}}}" + (f":v{version}" if version else "")

    def requests(self, model: str) -> str:
        return f"{self._of(model)}:req"

    def replies(self, model: str, gateway_id: str) -> str:
        return f"{self._of(model)}:reply:{gateway_id}"

    def is_reply_stream(self, model: str, key: str) -> bool:
        """Whether ``key`` may receive this model's answers (a record cannot name any other
        key for a worker to write to)."""
        return key.startswith(f"{self._of(model)}:reply:") and len(key) <= 200

    def dead_letters(self, model: str) -> str:
        return f"{self._of(model)}:dead"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def workers(self, model: str) -> str:
        return f"{self._of(model)}:workers"

    def attestations(self, model: str) -> str:
        return f"{self._of(model)}:attest"

    def job(self, model: str, job_id: str) -> str:
        return f"{self._of(model.partition('@')[0])}:job:{job_id}"

    @property
    def repository(self) -> str:
        return f"{self.prefix}:repository"

    @property
    def hosts(self) -> str:
        return f"{self.prefix}:hosts"


def _connection_options(url: SecretStr, ca_file: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {"health_check_interval": 30, "socket_connect_timeout": 5,
                               "socket_timeout": 5}
    if url.get_secret_value().startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                       ssl_ca_certs=str(ca_file) if ca_file else None)
    return options


def connect(url: SecretStr, ca_file: Path | None, cluster: bool = False,
            **extra: Any) -> redis.Redis:
    """A synchronous client; credentials stay inside the connection pool. With ``cluster``,
    ``url`` names one node of a Redis Cluster and the client finds the others."""
    options = {**_connection_options(url, ca_file), **extra}
    if cluster:
        client: Any = redis.RedisCluster.from_url(url.get_secret_value(), **options)
        return cast(redis.Redis, client)
    return redis.Redis.from_url(url.get_secret_value(), **options)


def connect_async(url: SecretStr, ca_file: Path | None, max_connections: int | None = None,
                  pool_timeout_s: float = 5.0, cluster: bool = False,
                  **extra: Any) -> aioredis.Redis:
    """An asyncio client. With ``max_connections``, a caller waits up to ``pool_timeout_s``
    for a free connection instead of failing at once (per node on a cluster)."""
    options = {**_connection_options(url, ca_file), **extra}
    if cluster:
        options.pop("health_check_interval", None)
        if max_connections is not None:
            options["max_connections"] = max_connections
        client: Any = aioredis.RedisCluster.from_url(url.get_secret_value(), **options)
        return cast(aioredis.Redis, client)
    if max_connections is None:
        return aioredis.Redis.from_url(url.get_secret_value(), **options)
    pool = aioredis.BlockingConnectionPool.from_url(
        url.get_secret_value(), max_connections=max_connections, timeout=pool_timeout_s,
        **options)
    return aioredis.Redis(connection_pool=pool)


def _str(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _delivery(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1,
              spool: PayloadSpool | None = None) -> Delivery:
    payload_file = _str(fields.get(b"file", b""))
    body = fields.get(b"body", b"")
    if payload_file:
        body = (spool.take(payload_file) if spool is not None else None) or b""
    try:
        mode = Mode(_str(fields.get(b"mode", b"")))
    except ValueError:
        mode = Mode.STANDARD  # an unknown mode fails to open as a standard record: per item
    return Delivery(
        entry_id=_str(entry_id),
        request_id=_str(fields.get(b"id", b"")),
        reply_to=_str(fields.get(b"reply", b"")),
        body=body,
        deadline_ms=_int(fields.get(b"deadline")),
        deliveries=deliveries,
        mode=mode,
        job_ttl_s=_int(fields.get(b"job")),
        enqueued_ms=_int(entry_id.split(b"-", 1)[0]),
        traceparent=_str(fields.get(b"tp", b"")),
        payload_file=payload_file,
    )


def _fields(pairs: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields from RESP2's flat list (name, value, name, value, ...)."""
    values = iter(pairs)
    return dict(zip(values, values, strict=False))


def _float(value: bytes | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def _queue_stats(depth: Any, groups: Any, live: Any) -> QueueStats:
    """From XLEN, XINFO GROUPS and ZCOUNT replies (an error reply, e.g. no stream yet,
    counts as empty)."""
    group = next((g for g in groups if _name(g["name"]) == GROUP), None) \
        if isinstance(groups, list) else None
    return QueueStats(depth=depth if isinstance(depth, int) else 0,
                      lag=int(group.get("lag") or 0) if group else 0,
                      pending=int(group.get("pending") or 0) if group else 0,
                      live_workers=int(live) if isinstance(live, int) else 0)


def _name(value: bytes | str) -> str:
    return _str(value) if isinstance(value, bytes) else str(value)


def _int(value: bytes | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class RedisWorkerBroker:
    """A worker's connection to one model's request stream (synchronous, thread-safe).
    With ``lane`` (a single Redis, not a Cluster), taking requests and posting answers go
    over that lean connection."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str, consumer: str,
                 reply_maxlen: int = 10_000, spool: PayloadSpool | None = None,
                 lane: BlockingRedisLane | None = None) -> None:
        self._client = client
        self._lane = lane
        self._spool = spool
        self._keys = keys
        self._model = model
        self._stream = keys.requests(model)
        self._consumer = consumer
        self._reply_maxlen = reply_maxlen
        self._finish = client.register_script(_FINISH)
        self._forget = client.register_script(_FORGET_CONSUMER)
        self._beat = client.register_script(_HEARTBEAT)
        self._stalls = StallWatch()

    @property
    def consumer(self) -> str:
        return self._consumer

    def ensure_group(self) -> None:
        try:
            self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def publish(self, sealed_spec: bytes) -> None:
        """Announce the model's spec (sealed) and this worker's liveness."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(self._keys.models, self._model, sealed_spec)
        pipe.zadd(self._keys.workers(self._model), {self._consumer: time.time()})
        pipe.execute()

    def heartbeat(self) -> None:
        with self._stalls.command(answers=_ANSWERS):
            self._beat(keys=[self._keys.workers(self._model)],
                       args=[time.time(), self._consumer])

    def publish_attestation(self, document: str) -> None:
        self._client.hset(self._keys.attestations(self._model), self._consumer, document)

    def leave(self) -> None:
        """Stop being counted as live; leave the group if nothing is pending here."""
        # If Redis is already gone, the heartbeat entry simply ages out.
        with contextlib.suppress(redis.RedisError, OSError):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.workers(self._model), self._consumer)
            pipe.hdel(self._keys.attestations(self._model), self._consumer)
            pipe.execute()
            self._forget_consumer(self._consumer)

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        response: Any
        with self._stalls.command(block_ms / 1000, _ANSWERS):
            if self._lane is not None:
                response = self._lane.call("XREADGROUP", "GROUP", GROUP, self._consumer,
                                           "COUNT", count, "BLOCK", block_ms, "STREAMS",
                                           self._stream, ">", block_s=block_ms / 1000)
                entries = [(entry_id, _fields(pairs)) for entry_id, pairs in
                           (response[0][1] if response else []) if pairs]
            else:
                response = self._client.xreadgroup(GROUP, self._consumer,
                                                   {self._stream: ">"}, count=count,
                                                   block=block_ms)
                entries = response[0][1] if response else []
        return [_delivery(entry_id, fields, spool=self._spool)
                for entry_id, fields in entries if fields]

    def _forget_payloads(self, deliveries: Iterable[Delivery]) -> None:
        """Remove spooled payloads of entries this worker acked (and so no one else will
        read): after the ack, so that a crash in between leaves a file, never a lost one."""
        if self._spool is not None:
            for delivery in deliveries:
                if delivery.payload_file:
                    self._spool.remove(delivery.payload_file)

    def finish(self, replies: Sequence[Reply]) -> int:
        """Post, ack and delete; returns how many were still ours to answer."""
        if not replies:
            return 0
        keys = [self._stream]
        args: list[Any] = [GROUP, self._consumer, self._reply_maxlen, REPLY_STREAM_TTL_S]
        for reply in replies:
            delivery = reply.delivery
            if delivery.is_job:
                job_ttl, key = delivery.job_ttl_s, self._keys.job(self._model, delivery.request_id)
            elif self._keys.is_reply_stream(self._model, delivery.reply_to):
                job_ttl, key = 0, delivery.reply_to
            else:
                job_ttl, key = -1, self._stream
            keys.append(key)
            args.extend([delivery.entry_id, delivery.request_id, "1" if reply.ok else "0",
                         reply.body, reply.batch_size, job_ttl,
                         f"{reply.queue_s * 1000:.3f}", f"{reply.engine_s * 1000:.3f}"])
        answered = int(self._run_finish(keys, args))
        if answered == len(replies):  # else some were taken over: their new owner removes
            self._forget_payloads(reply.delivery for reply in replies)
        return answered

    def _run_finish(self, keys: list[str], args: list[Any]) -> Any:
        if self._lane is None:
            return self._finish(keys=keys, args=args)
        try:
            return self._lane.call("EVALSHA", _FINISH_SHA, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis restarted (or flushed its scripts): EVAL runs it and caches it again
            return self._lane.call("EVAL", _FINISH, len(keys), *keys, *args)

    def drop(self, deliveries: Sequence[Delivery]) -> None:
        """Ack and delete requests that need no answer (their caller gave up); a job past
        its deadline is marked failed so that its owner learns it."""
        if deliveries:
            ids = [delivery.entry_id for delivery in deliveries]
            pipe = self._client.pipeline(transaction=False)
            for delivery in deliveries:
                if delivery.is_job:
                    key = self._keys.job(self._model, delivery.request_id)
                    pipe.hset(key, mapping={"state": JobState.FAILED.value,
                                            "error": "no answer within the job's deadline"})
                    pipe.expire(key, delivery.job_ttl_s)
            pipe.xack(self._stream, GROUP, *ids)
            pipe.xdel(self._stream, *ids)
            pipe.execute()
            self._forget_payloads(deliveries)

    def _deliveries_with_counts(self, entries: list[tuple[bytes, dict[bytes, bytes]]]
                                ) -> list[Delivery]:
        entries = [(entry_id, fields) for entry_id, fields in entries if fields]
        if not entries:
            return []
        pipe = self._client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self._stream, GROUP, min=entry_id, max=entry_id, count=1)
        counts = []
        pending: Any
        for pending in pipe.execute():
            counts.append(int(pending[0]["times_delivered"]) if pending else 1)
        return [_delivery(entry_id, fields, deliveries, self._spool)
                for (entry_id, fields), deliveries in zip(entries, counts, strict=True)]

    def reclaim(self, min_idle_ms: int, count: int) -> list[Delivery]:
        response: Any = self._client.xautoclaim(self._stream, GROUP, self._consumer,
                                                min_idle_time=min_idle_ms, start_id="0-0",
                                                count=count)
        return self._deliveries_with_counts(list(response[1]))

    def dead_consumers(self, dead_after_s: float) -> list[str]:
        """Consumers of the group whose heartbeat expired (or that never had one); right
        after Redis stalled, those that were alive when it began get time to beat again."""
        pipe = self._client.pipeline(transaction=False)
        pipe.xinfo_consumers(self._stream, GROUP)
        pipe.zrange(self._keys.workers(self._model), 0, -1, withscores=True)
        with self._stalls.command(answers=_ANSWERS):
            consumers, beats = pipe.execute()
        since = self._stalls.live_since(dead_after_s)
        alive = {_str(name) for name, score in beats if float(score) >= since}
        alive.add(self._consumer)
        names = [_name(consumer["name"]) for consumer in consumers]
        return [name for name in names if name not in alive]

    def reclaim_dead(self, dead_after_s: float, count: int) -> list[Delivery]:
        """Take over what dead consumers hold (up to ``count``), and forget the empty ones."""
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = []
        for consumer in self.dead_consumers(dead_after_s):
            if len(claimed) < count:
                pending: Any = self._client.xpending_range(
                    self._stream, GROUP, min="-", max="+", count=count - len(claimed),
                    consumername=consumer)
                ids = [item["message_id"] for item in pending]
                if ids:
                    # The idle bound keeps two live workers from both taking the same entry.
                    taken: Any = self._client.xclaim(
                        self._stream, GROUP, self._consumer,
                        min_idle_time=int(dead_after_s * 500), message_ids=ids)
                    claimed.extend((entry_id, fields) for entry_id, fields in taken)
            self._forget_consumer(consumer)
        return self._deliveries_with_counts(claimed)

    def _forget_consumer(self, consumer: str) -> None:
        self._forget(keys=[self._stream, self._keys.workers(self._model),
                           self._keys.attestations(self._model)], args=[GROUP, consumer])

    def dead_letter(self, reply: Reply, reason: str) -> None:
        delivery = reply.delivery
        self._client.xadd(
            self._keys.dead_letters(self._model),
            {"id": delivery.request_id, "reply": delivery.reply_to, "body": delivery.body,
             "deadline": str(delivery.deadline_ms), "mode": delivery.mode.value,
             "reason": reason, "deliveries": str(delivery.deliveries)},
            maxlen=DEAD_LETTER_MAXLEN, approximate=True,
        )
        self.finish([reply])


@contextlib.asynccontextmanager
async def _queue_errors(action: str) -> AsyncIterator[None]:
    """Every failure to reach Redis becomes ``NotReady`` (503), never a library error."""
    try:
        yield
    except redis.ResponseError as exc:
        # e.g. Redis at maxmemory with noeviction refuses writes: overloaded, nothing dropped.
        raise NotReady(f"queue refused to {action}: {str(exc).split(' ', 1)[0]}") from None
    except redis.TimeoutError:
        raise QueueStalled(f"queue did not answer in time to {action}") from None
    except (redis.RedisError, OSError) as exc:
        raise NotReady(f"queue unreachable ({type(exc).__name__})") from None


class RedisGatewayBroker:
    """A gateway's side of the queue (asyncio). With ``lanes`` (a single Redis, not a
    Cluster), the per-request commands go over lean pipelined connections (``RedisLane``):
    one shared by every request's XADD, one per model for its blocking reply reader."""

    def __init__(self, client: aioredis.Redis, reader: aioredis.Redis, keys: Keys,
                 gateway_id: str, spool: PayloadSpool | None = None,
                 spool_min_bytes: int = 32 * 1024,
                 lanes: Callable[[], RedisLane] | None = None) -> None:
        self._client = client
        self._lanes = lanes
        self._lane = lanes() if lanes is not None else None
        self._reply_lanes: dict[str, RedisLane] = {}
        self._spool = spool
        self._spool_min_bytes = spool_min_bytes
        self._reader = reader
        self._keys = keys
        self._gateway_id = gateway_id
        # Each gateway run has fresh, random reply streams: reading from the start is safe.
        self._last_reply_id: dict[str, bytes | str] = {}
        self._stalls = StallWatch()

    def reply_stream(self, model: str) -> str:
        return self._keys.replies(model, self._gateway_id)

    async def ping(self) -> None:
        async with _queue_errors("answer"):
            await self._client.ping()

    async def close(self) -> None:
        try:
            for model in self._last_reply_id:  # one key at a time: they live in many slots
                await self._client.delete(self.reply_stream(model))
        except (redis.RedisError, OSError):
            pass  # Redis already gone: the stream expires by itself
        finally:
            await self._client.aclose()
            await self._reader.aclose()
            for lane in [self._lane, *self._reply_lanes.values()]:
                if lane is not None:
                    await lane.close()

    async def enqueue(self, model: str, request_id: str, body: bytes, deadline_ms: int,
                      mode: Mode = Mode.STANDARD, job_ttl_s: int = 0,
                      traceparent: str = "") -> None:
        fields: dict[Any, Any] = {"id": request_id, "deadline": str(deadline_ms),
                                  "reply": "" if job_ttl_s else self.reply_stream(model)}
        # Jobs stay in Redis: they must outlive this gateway and its host's spool.
        spool = self._spool if not job_ttl_s and len(body) >= self._spool_min_bytes else None
        if spool is not None:
            try:
                # A local file write (page cache), cheaper than the copy to Redis it replaces.
                fields["file"] = spool.put(body)
            except OSError as exc:  # e.g. its disk is full: Redis takes the payload instead
                log.warning("payload spool unusable (%s); queueing the payload in Redis",
                            exc.strerror)
                spool = None
        if spool is None:
            fields["body"] = body
        if mode is not Mode.STANDARD:
            fields["mode"] = mode.value
        if job_ttl_s:
            fields["job"] = str(job_ttl_s)
        if traceparent:
            fields["tp"] = traceparent
        try:
            async with _queue_errors("take the request"):
                with self._stalls.command(answers=_ANSWERS):
                    await self._xadd(model, fields)
        except BaseException:  # not queued (or not known to be): the payload goes too
            if spool is not None:
                spool.remove(fields["file"])
            raise

    async def _xadd(self, model: str, fields: dict[Any, Any]) -> None:
        if self._lane is not None:
            await self._lane.call("XADD", self._keys.requests(model), "*",
                                  *(item for pair in fields.items() for item in pair))
        else:
            await self._client.xadd(self._keys.requests(model), fields)

    async def backlog(self, model: str) -> int:
        async with _queue_errors("report its backlog"):
            return int(await self._client.xlen(self._keys.requests(model)))

    async def models(self) -> dict[str, bytes]:
        async with _queue_errors("list models"):
            table: Any = await self._client.hgetall(self._keys.models)
        return {_str(name): bytes(spec) for name, spec in table.items()}

    async def save_job(self, job_id: str, job: Job, ttl_s: int) -> None:
        fields = {"state": job.state.value, "model": job.model, "owner": job.owner,
                  "outputs": json.dumps(job.outputs), "binary": "1" if job.binary else "0"}
        key = self._keys.job(job.model, job_id)
        async with _queue_errors("store the job"):
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def load_job(self, model: str, job_id: str) -> Job | None:
        async with _queue_errors("look up the job"):
            table: Any = await self._client.hgetall(self._keys.job(model, job_id))
        fields: dict[str, bytes] = {key.decode(): value for key, value in table.items()}
        try:
            return Job(model=fields["model"].decode(), owner=fields["owner"].decode(),
                       outputs=json.loads(fields["outputs"]),
                       binary=fields.get("binary") == b"1",
                       state=JobState(fields["state"].decode()),
                       ok=fields.get("ok") == b"1", body=fields.get("body", b""),
                       error=fields.get("error", b"").decode("utf-8", "replace"))
        except (KeyError, ValueError):
            return None  # unknown, expired, or not a complete job record

    async def attestations(self, model: str) -> list[str]:
        async with _queue_errors("list attestations"):
            table: Any = await self._client.hgetall(self._keys.attestations(model))
        return [value.decode() for value in table.values()]

    async def live_workers(self, model: str, max_age_s: float) -> int:
        async with _queue_errors("count workers"):
            with self._stalls.command(answers=_ANSWERS):
                beats: Any = await self._client.zrange(self._keys.workers(model), 0, -1,
                                                       withscores=True)
        # judged once the answer is in: if this very call waited out a stall, it says so
        return _count_live(beats, self._stalls.live_since(max_age_s))

    async def queue_stats(self, model: str, max_age_s: float) -> QueueStats:
        stream = self._keys.requests(model)
        async with _queue_errors("report queue statistics"):
            pipe = self._client.pipeline(transaction=False)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.zrange(self._keys.workers(model), 0, -1, withscores=True)
            with self._stalls.command(answers=_ANSWERS):
                depth, groups, beats = await pipe.execute(raise_on_error=False)
        live = (beats if isinstance(beats, Exception)
                else _count_live(beats, self._stalls.live_since(max_age_s)))
        return _queue_stats(depth, groups, live)

    async def model_states(self) -> dict[str, ModelState]:
        async with _queue_errors("report the repository"):
            table: Any = await self._client.hgetall(self._keys.repository)
        return _model_states(table)

    async def request_model_state(self, model: str, action: str) -> ModelState:
        async with _queue_errors("record the request"):
            current = ModelState.from_json(
                await self._client.hget(self._keys.repository, model) or b"")
            state = ModelState(action, (current.serial if current else 0) + 1)
            await self._client.hset(self._keys.repository, model, state.to_json())
        return state

    async def host_statuses(self, max_age_s: float) -> list[HostStatus]:
        async with _queue_errors("report the repository"):
            table: Any = await self._client.hgetall(self._keys.hosts)
        return _host_statuses(table, max_age_s)

    async def read_replies(self, model: str, block_ms: int,
                           count: int = 512) -> list[ReplyMessage]:
        last = self._last_reply_id.setdefault(model, b"0-0")
        stream = self.reply_stream(model)
        async with _queue_errors("deliver answers"):
            with self._stalls.command(block_ms / 1000, _ANSWERS):
                response = await self._xread(model, stream, last, block_ms, count)
        messages: list[ReplyMessage] = []
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._last_reply_id[model] = entry_id
                request_id = _str(fields.get(b"id", b""))
                if request_id:
                    messages.append(ReplyMessage(
                        request_id, fields.get(b"ok") == b"1", fields.get(b"body", b""),
                        _int(fields.get(b"bs")) or 1, _float(fields.get(b"qw")) / 1000,
                        _float(fields.get(b"et")) / 1000))
        return messages

    async def _xread(self, model: str, stream: str, last: bytes | str, block_ms: int,
                     count: int) -> Any:
        if self._lanes is None:
            return await self._reader.xread({stream: last}, count=count, block=block_ms)
        lane = self._reply_lanes.get(model)
        if lane is None:
            lane = self._reply_lanes[model] = self._lanes()
        flat = await lane.call("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS",
                               stream, last, block_s=block_ms / 1000)
        return [(key, [(entry_id, _fields(pairs)) for entry_id, pairs in entries])
                for key, entries in flat or []]


def _count_live(beats: Any, since: float) -> int:
    """Members of a heartbeat sorted set (``ZRANGE … WITHSCORES``) that beat at ``since`` or
    later."""
    return sum(1 for _, score in beats if float(score) >= since)


def _model_states(table: dict[bytes, bytes]) -> dict[str, ModelState]:
    states = {}
    for name, value in table.items():
        state = ModelState.from_json(value)
        if state is not None:
            states[_str(name)] = state
    return states


def _host_statuses(table: dict[bytes, bytes], max_age_s: float) -> list[HostStatus]:
    """The hosts that wrote their status within ``max_age_s`` (the others are dead)."""
    oldest = time.time() - max_age_s
    statuses = [HostStatus.from_json(value) for value in table.values()]
    return [status for status in statuses if status is not None and status.seen >= oldest]


class RedisRepositoryControl:
    """A worker process's side of the repository records (synchronous)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._next_sweep = 0.0

    def model_states(self) -> dict[str, ModelState]:
        table: Any = self._client.hgetall(self._keys.repository)
        return _model_states(table)

    def publish_host(self, status: HostStatus, max_age_s: float) -> None:
        """Write this host's status; now and then also drop hosts silent for 10 times
        ``max_age_s`` (readers ignore them already; this only keeps the hash small)."""
        self._client.hset(self._keys.hosts, status.host, status.to_json())
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + 10 * max_age_s
        table: Any = self._client.hgetall(self._keys.hosts)
        oldest = time.time() - 10 * max_age_s
        for host, value in table.items():
            other = HostStatus.from_json(value)
            if other is None or other.seen < oldest:
                self._client.hdel(self._keys.hosts, host)

    def forget_host(self, host: str) -> None:
        self._client.hdel(self._keys.hosts, host)


def queue_stats_sync(client: redis.Redis, keys: Keys, model: str,
                     max_age_s: float) -> QueueStats:
    """Depth, lag, pending and live workers of one model's queue (for autoscalers)."""
    stream = keys.requests(model)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.zcount(keys.workers(model), time.time() - max_age_s, "+inf")
        depth, groups, live = pipe.execute(raise_on_error=False)
    except (redis.RedisError, OSError) as exc:
        raise NotReady(f"redis not reachable: {type(exc).__name__}") from None
    return _queue_stats(depth, groups, live)


def live_workers_sync(url: SecretStr, ca_file: Path | None, prefix: str, model: str,
                      max_age_s: float, cluster: bool = False) -> int:
    """Workers of ``model`` with a fresh heartbeat (for operators' tools and tests)."""
    client = connect(url, ca_file, cluster, socket_timeout=2, socket_connect_timeout=2)
    try:
        return int(client.zcount(Keys(prefix).workers(model), time.time() - max_age_s, "+inf"))
    except (redis.RedisError, OSError) as exc:
        raise NotReady(f"redis not reachable: {type(exc).__name__}") from None
    finally:
        client.close()


def ping_sync(url: SecretStr, ca_file: Path | None, cluster: bool = False) -> None:
    """Raise ``NotReady`` unless the Redis at ``url`` answers over its (TLS) connection."""
    try:
        client = connect(url, ca_file, cluster, socket_timeout=2, socket_connect_timeout=2)
    except (redis.RedisError, OSError) as exc:  # a cluster client connects at once
        raise NotReady(f"redis not reachable: {type(exc).__name__}") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise NotReady(f"redis not reachable: {type(exc).__name__}") from None
    finally:
        client.close()
