"""A gateway's side of the queue (asyncio): enqueue, read its reply streams, jobs, the
models and workers it routes to; every Redis failure becomes ``NotReady`` (503). The key
layout is documented in ``redis_common``."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from ppml_serve.errors import NotReady, QueueStalled
from ppml_serve.queue.contract import (
    HostStatus,
    Job,
    JobState,
    Mode,
    ModelState,
    QueueStats,
    ReplyMessage,
)
from ppml_serve.queue.liveness import StallWatch
from ppml_serve.queue.redis_common import (
    ANSWERS,
    Keys,
    as_str,
    fields_of,
    int_of,
    model_states_of,
    queue_stats_of,
)
from ppml_serve.queue.redis_lane import RedisLane
from ppml_serve.queue.spool import PayloadSpool

log = logging.getLogger("ppml_serve.queue")


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


def _float(value: bytes | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def _count_live(beats: Any, since: float) -> int:
    """Members of a heartbeat sorted set (``ZRANGE … WITHSCORES``) that beat at ``since`` or
    later."""
    return sum(1 for _, score in beats if float(score) >= since)


def _host_statuses(table: dict[bytes, bytes], max_age_s: float) -> list[HostStatus]:
    """The hosts that wrote their status within ``max_age_s`` (the others are dead)."""
    oldest = time.time() - max_age_s
    statuses = [HostStatus.from_json(value) for value in table.values()]
    return [status for status in statuses if status is not None and status.seen >= oldest]


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

    async def delete_streams(self, streams: set[str]) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            for stream in sorted(streams):  # one key at a time: they live in many slots
                await self._client.delete(stream)

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
                with self._stalls.command(answers=ANSWERS):
                    await self._xadd(model, fields)
        except BaseException:  # not queued (or not known to be): the payload goes too
            if spool is not None:
                spool.release(fields["file"])
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
        return {as_str(name): bytes(spec) for name, spec in table.items()}

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
            with self._stalls.command(answers=ANSWERS):
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
            with self._stalls.command(answers=ANSWERS):
                depth, groups, beats = await pipe.execute(raise_on_error=False)
        live = (beats if isinstance(beats, Exception)
                else _count_live(beats, self._stalls.live_since(max_age_s)))
        return queue_stats_of(depth, groups, live)

    async def model_states(self) -> dict[str, ModelState]:
        async with _queue_errors("report the repository"):
            table: Any = await self._client.hgetall(self._keys.repository)
        return model_states_of(table)

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
            with self._stalls.command(block_ms / 1000, ANSWERS):
                response = await self._xread(model, stream, last, block_ms, count)
        messages: list[ReplyMessage] = []
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._last_reply_id[model] = entry_id
                request_id = as_str(fields.get(b"id", b""))
                if request_id:
                    messages.append(ReplyMessage(
                        request_id, fields.get(b"ok") == b"1", fields.get(b"body", b""),
                        int_of(fields.get(b"bs")) or 1, _float(fields.get(b"qw")) / 1000,
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
        return [(key, [(entry_id, fields_of(pairs)) for entry_id, pairs in entries])
                for key, entries in flat or []]
