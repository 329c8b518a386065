"""Fault injection under load: kill or freeze each part of a local stack and count every answer.

Used by the fault tests (short runs) and ``bench/faults.py`` (longer runs, a table). Every
request sent is accounted for: answered correctly, answered wrongly, refused with a status,
refused at the connection (the gateway itself was down), or lost (no answer by the client's
own deadline, which is past the gateway's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from ppml_serve.engines import load_engine
from ppml_serve.errors import NotReady
from ppml_serve.local_stack import Child, LocalStack
from ppml_serve.models import DEMO_NAME, demo_model_path, demo_samples
from ppml_serve.queue.redis_common import live_workers_sync
from ppml_serve.state import read_api_key

FAULTS = ("worker-kill", "worker-freeze", "worker-rolling-restart", "redis-kill",
          "gateway-kill", "gateway-sigterm", "keybroker-kill", "redis-stall", "redis-maxmemory",
          "state-disk-full")


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    status: int | None
    """HTTP status; ``None`` when the connection failed (nothing was accepted)."""
    retry_after: str | None = None
    correct: bool | None = None
    """For a 200: whether the answer equals the model run locally."""
    lost: bool = False
    """No answer at all by the client's deadline."""


class SteadyLoad:
    """``concurrency`` clients, each sending one-image requests back to back, in a thread."""

    def __init__(self, url: str, api_key: str, ca_file: str, concurrency: int,
                 client_timeout_s: float) -> None:
        self._url = url
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._ca_file = ca_file
        self._concurrency = concurrency
        self._timeout_s = client_timeout_s
        self._images, _ = demo_samples()
        engine = load_engine(DEMO_NAME, demo_model_path().read_bytes())
        self._expected = engine.infer({"image": self._images})["probabilities"].argmax(axis=1)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                        name="steady-load")

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 10)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self._concurrency)
        async with httpx.AsyncClient(base_url=self._url, verify=self._ca_file,
                                     headers=self._headers, limits=limits,
                                     timeout=self._timeout_s) as http:
            await asyncio.gather(*(self._client(http, seed) for seed in
                                   range(self._concurrency)))

    async def _client(self, http: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            index = rng.randrange(len(self._images))
            body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                                "data": self._images[index].ravel().tolist()}]}
            started = time.monotonic()
            try:
                response = await http.post(f"/v2/models/{DEMO_NAME}/infer", json=body)
            except httpx.TimeoutException:
                self.outcomes.append(Outcome(started, time.monotonic(), None, lost=True))
                continue
            except httpx.HTTPError:
                self.outcomes.append(Outcome(started, time.monotonic(), None))
                await asyncio.sleep(0.05)  # the gateway is down: do not spin
                continue
            finished = time.monotonic()
            correct = None
            if response.status_code == 200:
                data = response.json()["outputs"][0]["data"]
                correct = int(np.argmax(data)) == int(self._expected[index])
            else:
                await asyncio.sleep(0.02)
            self.outcomes.append(Outcome(started, finished, response.status_code,
                                         response.headers.get("retry-after"), correct))


@dataclass
class FaultReport:
    fault: str
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    lost: int = 0
    connection_refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Non-200 answers by status code."""
    without_retry_after: int = 0
    """429/503 answers missing their Retry-After header (a defect)."""
    early_504: int = 0
    """504 answers sent before the request's own deadline (a defect)."""
    recovery_s: float = 0.0
    """From the fault to the end of the last failed request."""

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(fault: str, outcomes: list[Outcome], injected: float,
              request_timeout_s: float) -> FaultReport:
    report = FaultReport(fault, sent=len(outcomes))
    errors: Counter[str] = Counter()
    last_failure = injected
    for outcome in outcomes:
        if outcome.status == 200:
            report.ok += 1
            report.wrong += outcome.correct is False
            continue
        last_failure = max(last_failure, outcome.finished)
        if outcome.lost:
            report.lost += 1
        elif outcome.status is None:
            report.connection_refused += 1
        else:
            errors[str(outcome.status)] += 1
            if outcome.status in (429, 503) and not outcome.retry_after:
                report.without_retry_after += 1
            if outcome.status == 504 and \
                    outcome.finished - outcome.started < request_timeout_s - 0.5:
                report.early_504 += 1
    report.errors = dict(sorted(errors.items()))
    report.recovery_s = round(max(0.0, last_failure - injected), 2)
    return report


class Supervisor:
    """What ``ppml-serve up`` does in its main loop, in a thread: restart dead parts."""

    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack
        self._stop = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._stack.supervise()
            except Exception as exc:  # a crash loop: reported by the caller
                self.error = exc
                return

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def workers(stack: LocalStack) -> list[Child]:
    return [child for child in stack.children if child.name.startswith("worker")]


def _signal(child: Child | None, signum: int) -> None:
    if child is not None and child.process is not None and child.alive():
        child.process.send_signal(signum)
        if signum == signal.SIGKILL:
            child.process.wait(10)  # dead before anyone checks whether the stack recovered


def inject(stack: LocalStack, fault: str, freeze_s: float = 3.0) -> None:
    """Cause ``fault`` now; returns once it is caused (a freeze, once it is over)."""
    if fault == "worker-kill":
        _signal(workers(stack)[0], signal.SIGKILL)
    elif fault == "worker-freeze":
        victim = workers(stack)[0]
        _signal(victim, signal.SIGSTOP)
        time.sleep(freeze_s)
        _signal(victim, signal.SIGCONT)
    elif fault == "worker-rolling-restart":
        for victim in workers(stack):
            old = victim.process
            _signal(victim, signal.SIGTERM)
            wait_until(_replaced(victim, old), 60)
            wait_ready(stack, 60)
    elif fault == "redis-kill":
        if stack.redis.process is not None:
            stack.redis.process.send_signal(signal.SIGKILL)
            stack.redis.process.wait(10)
    elif fault == "redis-stall":  # frozen, not dead: every command waits
        if stack.redis.process is not None:
            stack.redis.process.send_signal(signal.SIGSTOP)
            time.sleep(freeze_s)
            stack.redis.process.send_signal(signal.SIGCONT)
    elif fault == "redis-maxmemory":  # full: every write but answers and heartbeats refused
        admin = redis.Redis.from_url(stack.redis.admin_url.get_secret_value(),
                                     ssl_ca_certs=str(stack.settings.ca_file))
        with admin:
            limit = admin.config_get("maxmemory").get("maxmemory") or "0"
            admin.config_set("maxmemory", 1)
            try:
                time.sleep(freeze_s)
            finally:
                admin.config_set("maxmemory", limit)
    elif fault == "state-disk-full":  # the state volume (AOF, spool, logs) at 0 bytes free
        _fill_volume(stack.settings.state_dir, freeze_s)
    elif fault == "gateway-kill":
        _signal(stack.gateway, signal.SIGKILL)
    elif fault == "gateway-sigterm":
        _signal(stack.gateway, signal.SIGTERM)
    elif fault == "keybroker-kill":
        _signal(stack.keybroker, signal.SIGKILL)
        time.sleep(1.0)
        _signal(workers(stack)[0], signal.SIGKILL)  # its replacement needs the broker back
    else:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")


SMALL_VOLUME_BYTES = 1 << 30
"""state-disk-full fills only a volume this small (a test tmpfs), never a real disk."""


def _fill_volume(directory: Path, hold_s: float) -> None:
    """Fill the volume of ``directory`` to the last byte, hold it full, then free it."""
    status = os.statvfs(directory)
    if status.f_blocks * status.f_frsize > SMALL_VOLUME_BYTES:
        raise ValueError(f"state-disk-full fills the volume of {directory}; run it with the "
                         "state directory on a small volume (bench/faults.py --small-volume)")
    filler = directory / "disk-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"\0" * (1 << 16)
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, block)
        with contextlib.suppress(OSError):  # and the last partial block
            while True:
                os.write(fd, b"\0" * 512)
        time.sleep(hold_s)
    finally:
        os.close(fd)
        filler.unlink()


def _replaced(child: Child, old: Any) -> Callable[[], bool]:
    return lambda: child.process is not old and child.alive()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def wait_ready(stack: LocalStack, timeout_s: float) -> bool:
    """Every part running, every worker announced, and the gateway ready."""
    api_key = read_api_key(stack.settings.state_dir)
    settings = stack.settings

    def ready() -> bool:
        if not stack.redis.alive() or not all(child.alive() for child in stack.children):
            return False
        try:
            for model in settings.models:
                live = live_workers_sync(stack.redis.url, settings.ca_file,
                                         settings.redis.prefix, model, settings.worker.heartbeat_s)
                if live < stack.workers:
                    return False
        except NotReady:
            return False
        try:
            response = httpx.get(f"{stack.url}/v2/health/ready", timeout=2,
                                 verify=str(stack.settings.ca_file),
                                 headers={"Authorization": f"Bearer {api_key}"})
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    return wait_until(ready, timeout_s)


@dataclass
class FaultRun:
    """One fault under load: its report, every outcome, and when the fault began and ended."""

    report: FaultReport
    outcomes: list[Outcome]
    injected: float
    over: float


def run_fault(stack: LocalStack, fault: str, concurrency: int = 8, before_s: float = 1.0,
              after_s: float = 4.0, freeze_s: float = 3.0) -> FaultReport:
    """Load, inject ``fault``, keep loading until recovered plus ``after_s``; count."""
    return run_fault_detailed(stack, fault, concurrency, before_s, after_s, freeze_s).report


def run_fault_detailed(stack: LocalStack, fault: str, concurrency: int = 8,
                       before_s: float = 1.0, after_s: float = 4.0,
                       freeze_s: float = 3.0) -> FaultRun:
    timeout = stack.settings.gateway.request_timeout_s
    with SteadyLoad(stack.url, read_api_key(stack.settings.state_dir),
                    str(stack.settings.ca_file), concurrency, timeout + 5) as load:
        time.sleep(before_s)
        injected = time.monotonic()
        inject(stack, fault, freeze_s)
        over = time.monotonic()
        wait_ready(stack, 60)
        time.sleep(after_s)
    return FaultRun(summarize(fault, load.outcomes, injected, timeout), load.outcomes,
                    injected, over)


def markdown_table(reports: list[FaultReport]) -> str:
    lines = ["| fault | sent | ok | errors by status | refused at connect | lost | wrong | "
             "recovery (s) |", "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        errors = ", ".join(f"{code}: {count}" for code, count in report.errors.items()) or "-"
        lines.append(f"| {report.fault} | {report.sent} | {report.ok} | {errors} | "
                     f"{report.connection_refused} | {report.lost} | {report.wrong} | "
                     f"{report.recovery_s} |")
    return "\n".join(lines) + "\n"
