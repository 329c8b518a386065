"""``ppml-serve up`` starts everything, answers, and stops leaving no process behind."""

from __future__ import annotations

import selectors
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from ppml_serve.bench.up_faults import alive, processes_mentioning
from ppml_serve.queue.redis_server import free_port


def test_up_serves_demo_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "ppml_serve", "up", "--state-dir", str(state),
         "--port", str(free_port()), "--grpc-port", str(free_port()), "--log-level",
         "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not any("self-check" in x for x in lines):
            if selector.select(timeout=1):
                line = process.stdout.readline().decode()
                if not line:
                    break
                lines.append(line)
        output = "".join(lines)
        assert any(line.startswith("ready https://127.0.0.1:") and " grpcs://127.0.0.1:" in line
                   for line in lines), output
        assert "8/8 correct" in output or "7/8 correct" in output, output
        for name in ("api-key", "redis.url", "ca-key.pem", "server-key.pem"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert (state / "ca.pem").exists()
        # Gateway and workers on this host reach Redis over a private Unix socket.
        assert (state / "redis.url").read_text().startswith("unix://ppml:")
        socket_file = state / "redis" / "redis.sock"
        assert stat.S_ISSOCK(socket_file.stat().st_mode)
        assert stat.S_IMODE(socket_file.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "redis").stat().st_mode) == 0o700
        redis_pid = int((state / "redis" / "redis.pid").read_text())
        children = processes_mentioning(str(state))
        assert len(children) >= 3  # supervisor, worker, gateway
        assert alive(redis_pid)
        secret = (state / "redis.url").read_text().split(":")[2].split("@")[0]
        assert not processes_mentioning(secret), "Redis password visible in a command line"
    finally:
        process.send_signal(signal.SIGTERM)
        remaining, _ = process.communicate(timeout=60)
    assert process.returncode == 0, remaining.decode()
    time.sleep(0.5)
    assert not processes_mentioning(str(state)), "a child process outlived 'up'"
    assert not alive(redis_pid), "redis-server outlived 'up'"


def _up_until_ready(state: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "ppml_serve", "up", "--state-dir", str(state),
         "--port", str(port), "--grpc-port", str(free_port()), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line or line.startswith("self-check"):
            break
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 0


def test_jobs_survive_a_restart_of_up(tmp_path: Path) -> None:
    from ppml_serve.client import Client
    from ppml_serve.models import demo_samples

    state, port = tmp_path / "state", free_port()
    images, labels = demo_samples()
    process = _up_until_ready(state, port)
    try:
        with Client(f"https://127.0.0.1:{port}", api_key=(state / "api-key").read_text().strip(),
                    ca_file=state / "ca.pem") as client:
            jobs = [client.submit("demo", images[i:i + 1]) for i in range(5)]
            assert all(client.result("demo", job, wait_s=10) is not None for job in jobs)
        time.sleep(1.2)  # appendfsync everysec
    finally:
        _stop(process)
    process = _up_until_ready(state, port)
    try:
        with Client(f"https://127.0.0.1:{port}", api_key=(state / "api-key").read_text().strip(),
                    ca_file=state / "ca.pem") as client:
            answers = [client.result("demo", job, wait_s=10) for job in jobs]
    finally:
        _stop(process)
    assert all(answer is not None for answer in answers), "a job was lost across the restart"
    predicted = [int(answer["probabilities"].argmax()) for answer in answers if answer]
    assert sum(p == int(label) for p, label in zip(predicted, labels[:5], strict=True)) >= 4


def test_up_takes_the_ports_it_is_given_for_redis_and_the_key_broker(tmp_path: Path) -> None:
    # found: up picked random ports for the managed Redis and the key broker (no firewall
    # rule or remote worker could name them)
    from ppml_serve.client import Client
    from ppml_serve.models import demo_samples

    from .conftest import running_stack, stack_settings

    redis_port, broker_port = free_port(), free_port()
    settings = stack_settings(tmp_path / "state", redis={"managed_port": redis_port},
                              keybroker={"port": broker_port})
    with running_stack(settings) as local:
        assert local.redis.port == redis_port
        assert (settings.state_dir / "keybroker.url").read_text().strip() \
            == f"https://127.0.0.1:{broker_port}"
        key = (settings.state_dir / "api-key").read_text().strip()
        with Client(local.url, api_key=key, ca_file=settings.ca_file) as client:
            assert client.infer("demo", demo_samples()[0][:1])["probabilities"].shape == (1, 10)
