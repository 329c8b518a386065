"""Output that nobody reads drops lines and counts them; it never blocks the writer. Log files
rotate under a follower that loses no line."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from ppml_serve.log_relay import DroppingOutput, LogFollower
from ppml_serve.logs import RotatingLogFile


def test_an_unread_pipe_costs_lines_never_a_blocked_writer() -> None:
    read_end, write_end = os.pipe()
    output = DroppingOutput(write_end, max_bytes=64 * 1024)
    started = time.monotonic()
    for index in range(20_000):  # ~2 MB: the pipe (64 KiB) and the buffer fill long before
        output.write(f"line {index:06d} " + "x" * 80 + "\n")
    assert time.monotonic() - started < 5, "a write waited for the reader"
    assert output.dropped > 10_000
    with os.fdopen(read_end, "rb") as reader:
        os.set_blocking(reader.fileno(), False)
        seen = b""

        def reported() -> int:  # a notice each time the reader caught up: they add up
            return sum(int(n) for n in re.findall(rb"(\d+) output line\(s\) dropped", seen))

        deadline = time.monotonic() + 10
        while reported() < output.dropped and time.monotonic() < deadline:
            chunk = reader.read(1 << 16)
            seen += chunk or b""
            if not chunk:
                time.sleep(0.01)
        assert b"line 000000" in seen  # what fitted came out, in order, then the count
        assert reported() == output.dropped
        output.close()


def test_a_closed_reader_is_a_counter_not_an_exception() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    output = DroppingOutput(write_end)
    for _ in range(100):
        output.write("nobody reads this\n")  # EPIPE in the writer thread, never here
    deadline = time.monotonic() + 5
    while not output.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert output.broken
    output.write("after\n")
    assert output.dropped >= 1
    output.close()


def test_follower_reads_every_line_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "part.log"
    saved = os.dup(1), os.dup(2)  # the handler points stdout/stderr at its file
    try:
        handler = RotatingLogFile(path, max_bytes=4096, backups=2)
        handler.setFormatter(logging.Formatter("%(message)s"))
        seen: list[str] = []
        follower = LogFollower(None, interval_s=0.01)
        follower.follow(path, seen.append)
        logger = logging.getLogger("test.rotation")
        logger.propagate = False
        logger.addHandler(handler)
        for index in range(300):  # ~6 rotations of 4 KiB
            logger.warning("entry %04d %s", index, "y" * 60)
            if index % 20 == 0:
                time.sleep(0.03)  # the follower sees each file before it is rotated away
        deadline = time.monotonic() + 5
        while len(seen) < 300 and time.monotonic() < deadline:
            time.sleep(0.02)
        follower.stop()
        logger.removeHandler(handler)
        handler.close()
        assert [line.split()[1] for line in seen] == [f"{i:04d}" for i in range(300)]
        assert (tmp_path / "part.log.1").exists() and not (tmp_path / "part.log.3").exists()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)


def test_log_file_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "part.log").symlink_to(target)
    try:
        RotatingLogFile(tmp_path / "part.log", max_bytes=4096, backups=1)
    except OSError:
        return
    raise AssertionError("a symlinked log file was opened")
