"""The Redis implementation of the queue contract, what its roles share: the key layout,
connections, reply parsing and the one-shot checks of operators' tools. The roles live
beside it (``redis_gateway``, ``redis_worker``, ``redis_repository``); with the lean
connections (``redis_lane``) they are the only modules that import redis.

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
    PREFIX:{MODEL}:seen:ID  string: an end-to-end blob already received (expires)
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

import time
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from ppml_serve.errors import NotReady
from ppml_serve.queue.contract import (
    ModelState,
    QueueStats,
)

GROUP = "workers"


ANSWERS = (redis.ResponseError,)
"""Errors that are Redis's answer (not its silence): they end a stall."""


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

    def seen(self, model: str, token: str) -> str:
        """An end-to-end request blob already received (replay refusal), expiring."""
        return f"{self._of(model)}:seen:{token}"

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


def as_str(value: bytes) -> str:
    return value.decode("ascii", "replace")


def fields_of(pairs: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields from RESP2's flat list (name, value, name, value, ...)."""
    values = iter(pairs)
    return dict(zip(values, values, strict=False))


def int_of(value: bytes | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def name_of(value: bytes | str) -> str:
    return as_str(value) if isinstance(value, bytes) else str(value)


def queue_stats_of(depth: Any, groups: Any, live: Any) -> QueueStats:
    """From XLEN, XINFO GROUPS and ZCOUNT replies (an error reply, e.g. no stream yet,
    counts as empty)."""
    group = next((g for g in groups if name_of(g["name"]) == GROUP), None) \
        if isinstance(groups, list) else None
    return QueueStats(depth=depth if isinstance(depth, int) else 0,
                      lag=int(group.get("lag") or 0) if group else 0,
                      pending=int(group.get("pending") or 0) if group else 0,
                      live_workers=int(live) if isinstance(live, int) else 0)


def model_states_of(table: dict[bytes, bytes]) -> dict[str, ModelState]:
    states = {}
    for name, value in table.items():
        state = ModelState.from_json(value)
        if state is not None:
            states[as_str(name)] = state
    return states


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
    return queue_stats_of(depth, groups, live)


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
