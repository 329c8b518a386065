"""Restart logic of the supervisor, retry policy and backoff (logic only, fake clock and part;
the real processes are killed in test_faults)."""

from __future__ import annotations

import json

import pytest

from ppml_serve.backoff import Backoff
from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.local_stack import RestartBudget, Supervised
from ppml_serve.queue.contract import Delivery, ErrorKind, error_body
from ppml_serve.settings import load_settings
from ppml_serve.worker.retries import RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Part:
    """Stands in for a process: dies when told, counts its starts."""

    def __init__(self) -> None:
        self.running = True
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.running = True


def _supervised(part: Part, clock: Clock, capacity: int = 3, refill_s: float = 60) -> Supervised:
    return Supervised("worker demo #0", lambda: part.running, part.start, lambda: -9,
                      lambda: ["boom: something broke"],
                      budget=RestartBudget(capacity, refill_s, clock),
                      backoff=Backoff(0.5, 8.0, jitter=lambda: 1.0), started=clock.now)


def _crash_and_restart(part: Part, supervised: Supervised, clock: Clock) -> float:
    part.running = False
    supervised.check(clock.now)
    assert supervised.restart_due is not None
    delay = supervised.restart_due - clock.now
    clock.now = supervised.restart_due
    supervised.check(clock.now)
    return delay


def test_restarts_back_off_exponentially() -> None:
    clock, part = Clock(), Part()
    supervised = _supervised(part, clock, capacity=10)
    delays = [_crash_and_restart(part, supervised, clock) for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert part.starts == 5


def test_a_crash_loop_gives_up_naming_the_part_and_its_last_lines() -> None:
    clock, part = Clock(), Part()
    supervised = _supervised(part, clock, capacity=3)
    for _ in range(3):
        _crash_and_restart(part, supervised, clock)
    part.running = False
    with pytest.raises(NotReady) as caught:
        supervised.check(clock.now)
    assert "worker demo #0 keeps crashing" in str(caught.value)
    assert "boom: something broke" in str(caught.value)


def test_the_restart_budget_refills_over_a_long_life() -> None:
    clock, part = Clock(), Part()
    supervised = _supervised(part, clock, capacity=3, refill_s=60)
    for _ in range(12):  # four times the budget, but one crash every two minutes
        _crash_and_restart(part, supervised, clock)
        clock.now += 120
        supervised.check(clock.now)  # a stable run resets the backoff too
    assert part.starts == 12
    assert _crash_and_restart(part, supervised, clock) == 0.5


def test_backoff_jitter_stays_within_half_and_full_delay() -> None:
    backoff = Backoff(1.0, 4.0)
    for ceiling in (1.0, 2.0, 4.0, 4.0):
        assert ceiling / 2 <= backoff.next_delay() <= ceiling
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_retry_policy_dead_letters_past_max_deliveries() -> None:
    policy = RetryPolicy(max_deliveries=3)

    def delivery(times: int) -> Delivery:
        return Delivery("1-0", "r", "s", b"", 0, deliveries=times)

    assert policy.dead_letter_reason(delivery(3)) is None
    assert policy.dead_letter_reason(delivery(4)) == "delivered 4 times without an answer"


def test_error_answers_carry_their_kind_and_words() -> None:
    # what the front reads (worker_error in native/front/src/plane.rs): kind and words
    body = json.loads(error_body(ErrorKind.INVALID_INPUT, "input 'image' has 3 dims"))
    assert body == {"kind": "invalid_input", "error": "input 'image' has 3 dims"}
    assert ErrorKind.of(ValueError()) is ErrorKind.ENGINE


def test_settings_refuse_a_reclaim_slower_than_the_deadline() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(gateway={"request_timeout_s": 10}, worker={"claim_idle_ms": 30_000})
    assert "worker.claim_idle_ms" in str(caught.value)
    assert "request_timeout_s" in str(caught.value)
    defaults = load_settings()
    assert defaults.worker.claim_idle_ms / 1000 < defaults.gateway.request_timeout_s / 2
    assert defaults.redis.persistence == "aof"
