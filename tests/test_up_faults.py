"""``ppml-serve up`` as an operator runs it, with its output and its life going wrong: nobody
reads its output, it is stopped, its stdout is closed, it is killed with ``kill -9``. Every
request sent is answered, and checked."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from ppml_serve.engines import load_engine
from ppml_serve.models import DEMO_NAME, demo_model_path, demo_samples
from ppml_serve.queue.redis_server import free_port

from .test_up import _alive, _processes_mentioning

IMAGES, _ = demo_samples()
EXPECTED = load_engine(DEMO_NAME, demo_model_path().read_bytes()).infer(
    {"image": IMAGES})["probabilities"].argmax(axis=1)


def _start_up(state: Path, port: int, log_level: str = "INFO",
              stderr: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ppml_serve", "up", "--state-dir", str(state), "--port", str(port),
         "--grpc-port", str(free_port()), "--log-level", log_level],
        stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)


def _read_until(process: subprocess.Popen[bytes], marker: str, timeout_s: float = 90) -> str:
    """stdout up to the line that starts with ``marker`` (then nobody reads it any more)."""
    assert process.stdout is not None
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
    raise AssertionError(f"'up' never printed {marker!r}: {''.join(lines)}")


def _requests(port: int, state: Path, count: int, concurrency: int = 16,
              timeout_s: float = 20) -> tuple[int, int, int]:
    """Send ``count`` one-image requests; (correct 200s, wrong 200s, anything else)."""
    key = (state / "api-key").read_text().strip()

    async def run() -> tuple[int, int, int]:
        ok = wrong = failed = 0
        queue = list(range(count))
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}",
                                     verify=str(state / "ca.pem"), timeout=timeout_s,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            async def client() -> None:
                nonlocal ok, wrong, failed
                while queue:
                    index = queue.pop() % len(IMAGES)
                    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                                        "data": IMAGES[index].ravel().tolist()}]}
                    try:
                        response = await http.post(f"/v2/models/{DEMO_NAME}/infer", json=body)
                    except httpx.HTTPError:
                        failed += 1
                        continue
                    if response.status_code != 200:
                        failed += 1
                    elif int(np.argmax(response.json()["outputs"][0]["data"])) == EXPECTED[index]:
                        ok += 1
                    else:
                        wrong += 1
            await asyncio.gather(*(client() for _ in range(concurrency)))
        return ok, wrong, failed

    return asyncio.run(run())


def _stop_and_check(process: subprocess.Popen[bytes], state: Path) -> bytes:
    """SIGTERM; 'up' exits 0 and leaves nothing running, Redis included."""
    redis_pid = int((state / "redis" / "redis.pid").read_text())
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, (errors or b"")[-3000:].decode()
    time.sleep(0.5)
    assert not _processes_mentioning(str(state)), "a child process outlived 'up'"
    assert not _alive(redis_pid), "redis-server outlived 'up'"
    return errors or b""


def test_output_nobody_reads_and_a_stopped_up_cost_no_request(tmp_path: Path) -> None:
    """Finding 1: the access log (a line per request) used to fill up's stderr pipe after
    ~700 requests and hang every request after it."""
    state, port = tmp_path / "state", free_port()
    process = _start_up(state, port)  # stderr: a pipe that is never read while serving
    try:
        _read_until(process, "self-check")
        assert _requests(port, state, 1500) == (1500, 0, 0)
        os.kill(process.pid, signal.SIGSTOP)  # the supervisor itself stopped (Ctrl-Z)
        try:
            assert _requests(port, state, 400) == (400, 0, 0)
        finally:
            os.kill(process.pid, signal.SIGCONT)
    finally:
        errors = _stop_and_check(process, state)
    # what it held for its reader came out once read (past its buffer it drops and says so)
    assert errors.count(b"ppml_serve.access") >= 1000 or b"line(s) dropped" in errors
    access = (state / "logs" / "gateway.log").read_text()
    assert access.count("ppml_serve.access") >= 1900, "the gateway's own log lost lines"


def test_closed_stdout_still_serves_and_shuts_down(tmp_path: Path) -> None:
    """Finding 3: with its stdout closed (``up | head -1``) 'up' died on BrokenPipeError
    before its shutdown, leaving redis-server running."""
    state, port = tmp_path / "state", free_port()
    process = _start_up(state, port, log_level="WARNING", stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    try:
        _read_until(process, "ready")
        process.stdout.close()  # the reader is gone: every later print is a broken pipe
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (state / "api-key").exists():
            time.sleep(0.2)
        assert _requests(port, state, 50) == (50, 0, 0)
        assert process.poll() is None, "'up' exited when its stdout closed"
        redis_pid = int((state / "redis" / "redis.pid").read_text())
        process.send_signal(signal.SIGHUP)  # its terminal went away: a clean stop
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.5)
    assert not _processes_mentioning(str(state)), "a child process outlived 'up'"
    assert not _alive(redis_pid), "redis-server outlived 'up'"


def test_up_serves_again_right_after_kill_9(tmp_path: Path) -> None:
    """Finding 2: after a crash the port check failed on TIME_WAIT sockets for ~60 s; and
    the killed run's redis-server is stopped (and said so) by the next 'up'."""
    state, port = tmp_path / "state", free_port()
    process = _start_up(state, port, log_level="WARNING", stderr=subprocess.DEVNULL)
    try:
        _read_until(process, "self-check")
        assert _requests(port, state, 64, concurrency=8) == (64, 0, 0)
        redis_pid = int((state / "redis" / "redis.pid").read_text())
        parts = [pid for pid in _processes_mentioning(str(state)) if pid != redis_pid]
        for pid in parts:  # the supervisor and its Python children; Redis is orphaned
            os.kill(pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert _alive(redis_pid)
    time.sleep(0.5)  # the gateway's sockets close: the port has TIME_WAIT connections
    started = time.monotonic()
    again = _start_up(state, port, log_level="WARNING")
    try:
        _read_until(again, "self-check", timeout_s=60)
        took = time.monotonic() - started
        assert took < 45, f"serving again took {took:.1f} s"
        assert not _alive(redis_pid), "the orphaned redis-server still runs"
        assert _requests(port, state, 32, concurrency=4) == (32, 0, 0)
    finally:
        errors = _stop_and_check(again, state)
    assert f"stopping redis-server (pid {redis_pid}) left running".encode() in errors


def _time_wait_on(port: int) -> bool:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # local address, remote address, state (06: TIME_WAIT), …
        if fields[1].endswith(f":{port:04X}") and fields[3] == "06":
            return True
    return False


def test_port_check_accepts_a_port_with_time_wait_connections(tmp_path: Path) -> None:
    """Finding 2, deterministically: the connections a killed gateway closed wait in
    TIME_WAIT for a minute; the listener may bind over them, so the pre-check must too."""
    from ppml_serve.local_stack import LocalStack

    from .conftest import stack_settings

    port = free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            server_side, _ = listener.accept()
            server_side.close()  # the server closes first: its end waits in TIME_WAIT
            client.recv(1)
    assert _time_wait_on(port)
    stack = LocalStack(stack_settings(tmp_path, gateway={"port": port,
                                                         "grpc_port": free_port()}))
    stack._check_port()  # raised ConfigError ("Address already in use") before
