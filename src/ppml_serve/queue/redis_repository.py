"""A worker process's side of the repository records: what administrators asked
(load/unload) and the host statuses it publishes."""

from __future__ import annotations

import time
from typing import Any

import redis

from ppml_serve.queue.contract import (
    HostStatus,
    ModelState,
)
from ppml_serve.queue.redis_common import (
    Keys,
    model_states_of,
)


class RedisRepositoryControl:
    """A worker process's side of the repository records (synchronous)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._next_sweep = 0.0

    def model_states(self) -> dict[str, ModelState]:
        table: Any = self._client.hgetall(self._keys.repository)
        return model_states_of(table)

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
