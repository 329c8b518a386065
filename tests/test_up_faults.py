"""``ppml-serve up`` as an operator runs it, with its output and its life going wrong: nobody
reads its output, it is stopped, its stdout is closed, it is killed with ``kill -9``. Every
request sent is answered, and checked (``ppml_serve.bench.up_faults`` runs each for real)."""

from __future__ import annotations

import socket
from pathlib import Path

from ppml_serve.bench.up_faults import alive, kill_9, output_stalled, stdout_closed
from ppml_serve.queue.redis_server import free_port


def test_output_nobody_reads_and_a_stopped_up_cost_no_request(tmp_path: Path) -> None:
    """Finding 1: the access log (a line per request) used to fill up's stderr pipe after
    ~700 requests and hang every request after it."""
    run = output_stalled(tmp_path, requests=1500, stopped=400)
    report = run.report
    assert (report.sent, report.ok, report.wrong, report.lost, report.errors) == \
        (1900, 1900, 0, 0, {}), report
    assert run.exit_code == 0 and not run.left_running, run.stderr[-3000:].decode()
    # what it held for its reader came out once read (past its buffer it drops and says so)
    assert run.stderr.count(b"ppml_serve.access") >= 1000 or b"line(s) dropped" in run.stderr
    access = (tmp_path / "state" / "logs" / "gateway.log").read_text()
    assert access.count("ppml_serve.access") >= 1900, "the gateway's own log lost lines"


def test_closed_stdout_still_serves_and_shuts_down(tmp_path: Path) -> None:
    """Finding 3: with its stdout closed (``up | head -1``) 'up' died on BrokenPipeError
    before its shutdown, leaving redis-server running. Now it serves on, and SIGHUP (its
    terminal gone) stops everything."""
    run = stdout_closed(tmp_path, requests=50)
    assert (run.report.ok, run.report.sent) == (50, 50), run.report
    assert run.exit_code == 0, "'up' did not stop cleanly"
    assert not run.left_running, f"left running: {run.left_running}"


def test_up_serves_again_right_after_kill_9(tmp_path: Path) -> None:
    """Finding 2: after a crash the port check failed on TIME_WAIT sockets for ~60 s; and
    the killed run's redis-server is stopped (and said so) by the next 'up'."""
    run = kill_9(tmp_path, requests=96)
    assert (run.report.ok, run.report.wrong, run.report.lost) == (96, 0, 0), run.report
    assert run.restart_s < 45, f"serving again took {run.restart_s:.1f} s"
    assert not alive(run.orphan_pid), "the orphaned redis-server still runs"
    assert f"stopping redis-server (pid {run.orphan_pid}) left running".encode() in run.stderr
    assert run.exit_code == 0 and not run.left_running


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
