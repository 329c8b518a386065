"""Faults of ``ppml-serve up`` itself, run for real against the command as an operator starts
it: nobody reads its output and it is stopped (Ctrl-Z), its stdout is closed, it is killed
with ``kill -9`` and started again. Every request sent is counted and its answer checked.

Used by the tests (``tests/test_up_faults.py``) and ``bench/faults.py --up``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ppml_serve.bench.faults import FaultReport
from ppml_serve.engines import load_engine
from ppml_serve.models import DEMO_NAME, demo_model_path, demo_samples
from ppml_serve.queue.redis_server import free_port

UP_FAULTS = ("up-output-stalled", "up-stdout-closed", "up-kill-9")


def processes_mentioning(text: str) -> list[int]:
    """Pids (other than this one) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_up(state: Path, port: int, log_level: str = "INFO",
             stderr: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ppml_serve", "up", "--state-dir", str(state), "--port", str(port),
         "--grpc-port", str(free_port()), "--log-level", log_level],
        stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)


def read_until(process: subprocess.Popen[bytes], marker: str, timeout_s: float = 90) -> str:
    """stdout up to the line that starts with ``marker`` (then nobody reads it any more)."""
    if process.stdout is None:
        raise ValueError("the process's stdout is not a pipe")
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = process.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if line.startswith(marker):
                return "".join(lines)
    raise TimeoutError(f"'up' never printed {marker!r}: {''.join(lines)}")


@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add_to(self, report: FaultReport) -> None:
        report.sent += self.sent
        report.ok += self.ok
        report.wrong += self.wrong
        report.lost += self.lost
        for status, count in self.errors.items():
            report.errors[status] = report.errors.get(status, 0) + count


@functools.cache
def _expected_classes() -> np.ndarray[Any, Any]:
    """The demo model's answers to its samples, run here once (the reference)."""
    images, _ = demo_samples()
    classes: np.ndarray[Any, Any] = load_engine(DEMO_NAME, demo_model_path().read_bytes()).infer(
        {"image": images})["probabilities"].argmax(axis=1)
    return classes


def send_requests(port: int, state: Path, count: int, concurrency: int = 16,
                  timeout_s: float = 20) -> Counts:
    """``count`` one-image requests from ``concurrency`` clients; every answer checked."""
    images, _ = demo_samples()
    expected = _expected_classes()
    key = (state / "api-key").read_text().strip()
    counts = Counts(sent=count)

    async def run() -> None:
        left = list(range(count))
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}",
                                     verify=str(state / "ca.pem"), timeout=timeout_s,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            async def client() -> None:
                while left:
                    index = left.pop() % len(images)
                    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                                        "data": images[index].ravel().tolist()}]}
                    try:
                        response = await http.post(f"/v2/models/{DEMO_NAME}/infer", json=body)
                    except httpx.TimeoutException:
                        counts.lost += 1
                        continue
                    except httpx.HTTPError:
                        counts.errors["refused"] = counts.errors.get("refused", 0) + 1
                        continue
                    if response.status_code != 200:
                        status = str(response.status_code)
                        counts.errors[status] = counts.errors.get(status, 0) + 1
                    elif int(np.argmax(response.json()["outputs"][0]["data"])) == expected[index]:
                        counts.ok += 1
                    else:
                        counts.wrong += 1
            await asyncio.gather(*(client() for _ in range(concurrency)))

    asyncio.run(run())
    return counts


@dataclass
class UpFaultRun:
    """What an ``up`` fault left behind, beyond the answers counted in ``report``."""

    report: FaultReport
    exit_code: int | None = None
    left_running: list[int] = field(default_factory=list)
    """Processes of the state directory (Redis included) still running after 'up' exited."""
    stderr: bytes = b""
    restart_s: float = 0.0
    """kill -9 until the next 'up' served again."""
    orphan_pid: int = 0
    """The redis-server the killed run left (up-kill-9)."""


def _stop(process: subprocess.Popen[bytes], run: UpFaultRun, state: Path,
          signum: int = signal.SIGTERM) -> None:
    redis_pid = int((state / "redis" / "redis.pid").read_text())
    process.send_signal(signum)
    try:
        _, errors = process.communicate(timeout=60)
    except ValueError:  # stdout already closed by the caller
        process.wait(60)
        errors = process.stderr.read() if process.stderr else b""
    run.exit_code = process.returncode
    run.stderr += errors or b""
    time.sleep(0.5)
    run.left_running = processes_mentioning(str(state)) + ([redis_pid] if alive(redis_pid)
                                                           else [])


def output_stalled(directory: Path, requests: int = 1500, stopped: int = 400) -> UpFaultRun:
    """Nobody reads 'up''s stdout or stderr while it serves ``requests`` (a line of access log
    each), then 'up' itself is stopped (SIGSTOP) while it serves ``stopped`` more."""
    state, port = directory / "state", free_port()
    process = start_up(state, port)
    run = UpFaultRun(FaultReport("up-output-stalled"))
    try:
        read_until(process, "self-check")
        send_requests(port, state, requests).add_to(run.report)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            send_requests(port, state, stopped).add_to(run.report)
        finally:
            os.kill(process.pid, signal.SIGCONT)
    finally:
        _stop(process, run, state)
    return run


def stdout_closed(directory: Path, requests: int = 200) -> UpFaultRun:
    """'up | head -1': its stdout closes after the first line; then SIGHUP (terminal gone)."""
    state, port = directory / "state", free_port()
    process = start_up(state, port, log_level="WARNING", stderr=subprocess.DEVNULL)
    run = UpFaultRun(FaultReport("up-stdout-closed"))
    try:
        read_until(process, "ready")
        if process.stdout is not None:
            process.stdout.close()  # every later print is a broken pipe
        send_requests(port, state, requests).add_to(run.report)
        if process.poll() is not None:
            run.exit_code = process.returncode  # died of its closed stdout
    finally:
        _stop(process, run, state, signal.SIGHUP)
    return run


def kill_9(directory: Path, requests: int = 200) -> UpFaultRun:
    """``kill -9`` of 'up' and its Python children (Redis is left orphaned), then 'up' again
    on the same port and state directory at once."""
    state, port = directory / "state", free_port()
    process = start_up(state, port, log_level="WARNING", stderr=subprocess.DEVNULL)
    run = UpFaultRun(FaultReport("up-kill-9"))
    try:
        read_until(process, "self-check")
        send_requests(port, state, requests // 2, concurrency=8).add_to(run.report)
        run.orphan_pid = int((state / "redis" / "redis.pid").read_text())
        for pid in processes_mentioning(str(state)):
            if pid != run.orphan_pid:
                os.kill(pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    killed = time.monotonic()
    again = start_up(state, port, log_level="WARNING")
    try:
        read_until(again, "self-check", timeout_s=60)
        run.restart_s = round(time.monotonic() - killed, 2)
        send_requests(port, state, requests - requests // 2, concurrency=8).add_to(run.report)
    finally:
        _stop(again, run, state)
    run.report.recovery_s = run.restart_s
    return run


def run_up_fault(fault: str, directory: Path) -> UpFaultRun:
    if fault == "up-output-stalled":
        return output_stalled(directory)
    if fault == "up-stdout-closed":
        return stdout_closed(directory)
    if fault == "up-kill-9":
        return kill_9(directory)
    raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(UP_FAULTS)}")
