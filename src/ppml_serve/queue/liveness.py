"""Whether a worker is alive, judged so that a stalled Redis does not make live workers look
dead.

Workers write a heartbeat (their wall-clock time) every ``heartbeat_s``; a worker whose last
heartbeat is older than ``max_age_s`` is dead. While Redis is frozen (SIGSTOP, a long fork,
a stalled disk) no heartbeat gets in, so right after it answers again every worker looks
dead. A ``StallWatch`` notices such a gap on its own clock (a command that took far longer
than it should) and, for ``max_age_s`` after it, also counts the workers that were alive when
the stall began: they get the time to beat again that the stall took from them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

STALL_THRESHOLD_S = 0.5
"""A command answered this much later than it should have means Redis stalled (a healthy
one answers in well under a millisecond; a worker misses no beat in half a second)."""


class StallWatch:
    """Remembers Redis's last stall; ``live_since`` gives the oldest heartbeat that counts.
    Fed by ``answered`` and ``unanswered`` (or the ``command`` context) around commands."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 threshold_s: float = STALL_THRESHOLD_S) -> None:
        self._clock = clock
        self._wall = wall
        self._threshold_s = threshold_s
        self._lock = threading.Lock()
        self._stalled = False
        """Redis has not answered since the stall began."""
        self._began_wall = 0.0
        """Wall-clock time at which the last stall began."""
        self._ended = float("-inf")
        """Own-clock time at which Redis answered again."""

    def answered(self, late_s: float) -> None:
        """A command was answered ``late_s`` later than it should have been (the time beyond
        a blocking command's own wait)."""
        with self._lock:
            if late_s >= self._threshold_s:
                began = self._wall() - late_s
                self._began_wall = min(self._began_wall, began) if self._stalled else began
            elif not self._stalled:
                return
            self._stalled = False
            self._ended = self._clock()

    def unanswered(self, waited_s: float) -> None:
        """A command got no answer (a timeout, a lost or refused connection) after
        ``waited_s``: no worker can beat now either."""
        with self._lock:
            if not self._stalled:
                self._stalled = True
                self._began_wall = self._wall() - max(0.0, waited_s)

    @contextlib.contextmanager
    def command(self, expected_s: float = 0.0,
                answers: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Time one command: ``expected_s`` is how long it blocks by design; ``answers`` are
        the exceptions that are Redis's answer (an error reply), not its silence."""
        started = self._clock()
        try:
            yield
        except answers:
            self.answered(self._clock() - started - expected_s)
            raise
        except Exception:
            self.unanswered(self._clock() - started)
            raise
        self.answered(self._clock() - started - expected_s)

    def live_since(self, max_age_s: float) -> float:
        """Wall-clock time of the oldest heartbeat that still means alive."""
        bound = self._wall() - max_age_s
        with self._lock:
            if self._stalled or self._clock() - self._ended < max_age_s:
                bound = min(bound, self._began_wall - max_age_s)  # grace after a stall
        return bound
