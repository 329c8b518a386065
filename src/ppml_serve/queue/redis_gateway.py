"""A gateway's side of the queue (asyncio) as its Python part sees it: the models and
workers it routes to, the repository's records, queue depths (the requests themselves are
the native front's: ``native/front/src/plane.rs``); every Redis failure becomes
``NotReady`` (503). The key layout is documented in ``redis_common``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis

from ppml_serve.errors import NotReady, QueueStalled
from ppml_serve.queue.contract import (
    HostStatus,
    ModelState,
    QueueStats,
)
from ppml_serve.queue.liveness import StallWatch
from ppml_serve.queue.redis_common import (
    ANSWERS,
    Keys,
    as_str,
    model_states_of,
    queue_stats_of,
)

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
    """A gateway's side of the queue (asyncio), over one connection pool."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._stalls = StallWatch()

    async def ping(self) -> None:
        async with _queue_errors("answer"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    async def delete_streams(self, streams: set[str]) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            for stream in sorted(streams):  # one key at a time: they live in many slots
                await self._client.delete(stream)

    async def backlog(self, model: str) -> int:
        async with _queue_errors("report its backlog"):
            return int(await self._client.xlen(self._keys.requests(model)))

    async def models(self) -> dict[str, bytes]:
        async with _queue_errors("list models"):
            table: Any = await self._client.hgetall(self._keys.models)
        return {as_str(name): bytes(spec) for name, spec in table.items()}

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
