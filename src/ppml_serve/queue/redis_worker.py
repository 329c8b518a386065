"""A worker's side of one model's request stream: take requests, post answers (owner-checked,
in one Lua script), heartbeats, reclaiming from dead consumers, dead-lettering. The key
layout is documented in ``redis_common``."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from ppml_serve.queue.contract import (
    Delivery,
    JobState,
    Mode,
    Reply,
)
from ppml_serve.queue.liveness import StallWatch
from ppml_serve.queue.redis_common import (
    ANSWERS,
    GROUP,
    Keys,
    as_str,
    fields_of,
    int_of,
    name_of,
)
from ppml_serve.queue.redis_lane import BlockingRedisLane
from ppml_serve.queue.spool import PayloadSpool

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


def _delivery(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int = 1,
              spool: PayloadSpool | None = None) -> Delivery:
    payload_file = as_str(fields.get(b"file", b""))
    body = fields.get(b"body", b"")
    if payload_file:
        body = (spool.take(payload_file) if spool is not None else None) or b""
    try:
        mode = Mode(as_str(fields.get(b"mode", b"")))
    except ValueError:
        mode = Mode.STANDARD  # an unknown mode fails to open as a standard record: per item
    return Delivery(
        entry_id=as_str(entry_id),
        request_id=as_str(fields.get(b"id", b"")),
        reply_to=as_str(fields.get(b"reply", b"")),
        body=body,
        deadline_ms=int_of(fields.get(b"deadline")),
        deliveries=deliveries,
        mode=mode,
        job_ttl_s=int_of(fields.get(b"job")),
        enqueued_ms=int_of(entry_id.split(b"-", 1)[0]),
        traceparent=as_str(fields.get(b"tp", b"")),
        payload_file=payload_file,
    )


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
        with self._stalls.command(answers=ANSWERS):
            self._beat(keys=[self._keys.workers(self._model)],
                       args=[time.time(), self._consumer])

    def publish_attestation(self, document: str) -> None:
        self._client.hset(self._keys.attestations(self._model), self._consumer, document)

    def remember_once(self, token: str, owner: str, ttl_ms: int) -> bool:
        key = self._keys.seen(self._model, token)
        if self._client.set(key, owner, nx=True, px=ttl_ms):
            return True
        recorded = self._client.get(key)
        return recorded is not None and (recorded.decode() if isinstance(recorded, bytes)
                                         else str(recorded)) == owner

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
        with self._stalls.command(block_ms / 1000, ANSWERS):
            if self._lane is not None:
                response = self._lane.call("XREADGROUP", "GROUP", GROUP, self._consumer,
                                           "COUNT", count, "BLOCK", block_ms, "STREAMS",
                                           self._stream, ">", block_s=block_ms / 1000)
                entries = [(entry_id, fields_of(pairs)) for entry_id, pairs in
                           (response[0][1] if response else []) if pairs]
            else:
                response = self._client.xreadgroup(GROUP, self._consumer,
                                                   {self._stream: ">"}, count=count,
                                                   block=block_ms)
                entries = response[0][1] if response else []
        return [_delivery(entry_id, fields, spool=self._spool)
                for entry_id, fields in entries if fields]

    def _forget_payloads(self, deliveries: Iterable[Delivery]) -> None:
        """Release spooled payloads of entries this worker acked (and so no one else will
        read): after the ack, so that a crash in between leaves a file, never a lost one."""
        if self._spool is not None:
            for delivery in deliveries:
                if delivery.payload_file:
                    self._spool.release(delivery.payload_file)

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
        with self._stalls.command(answers=ANSWERS):
            consumers, beats = pipe.execute()
        since = self._stalls.live_since(dead_after_s)
        alive = {as_str(name) for name, score in beats if float(score) >= since}
        alive.add(self._consumer)
        names = [name_of(consumer["name"]) for consumer in consumers]
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
