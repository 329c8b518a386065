"""Exponential backoff with jitter, for every retry loop (reconnects, restarts, key release)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double from ``initial_s`` up to ``max_s``; each is jittered to between half
    and all of its value, so that parts retrying together do not retry in lockstep."""

    def __init__(self, initial_s: float = 0.1, max_s: float = 5.0, factor: float = 2.0,
                 jitter: Callable[[], float] = random.random) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._jitter = jitter
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor ** self.attempts)
        self.attempts += 1
        return ceiling * (0.5 + self._jitter() / 2)

    def reset(self) -> None:
        self.attempts = 0
