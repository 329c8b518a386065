"""CPU time per part of a local stack (from /proc), for costs per request."""

from __future__ import annotations

import os
from pathlib import Path

from ppml_serve.local_stack import Child, LocalStack

_TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("gateway", "redis", "worker")
FRONT_THREAD = "ppml-front"
"""Threads of the native front (Rust) in a gateway process: reported as ``front``, a share
of ``gateway`` (not a part of its own: sums of parts leave it out)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def front_cpu_seconds(pid: int) -> float:
    """CPU time so far of the native front's threads in gateway process ``pid``."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "comm").read_text().strip() != FRONT_THREAD:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def part_pids(stack: LocalStack, extra: list[Child] | None = None) -> dict[str, list[int]]:
    """Process ids of the stack's gateways, Redis and workers."""
    pids: dict[str, list[int]] = {part: [] for part in PARTS}
    if stack.redis.process is not None:
        pids["redis"].append(stack.redis.process.pid)
    for child in [*stack.children, *(extra or [])]:
        if child.process is None:
            continue
        if child.name.startswith("gateway"):
            pids["gateway"].append(child.process.pid)
        elif child.name.startswith("worker"):
            pids["worker"].append(child.process.pid)
    return pids


def snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    parts = {part: sum(cpu_seconds(pid) for pid in ids) for part, ids in pids.items()}
    parts["front"] = sum(front_cpu_seconds(pid) for pid in pids.get("gateway", []))
    return parts


def per_request_ms(before: dict[str, float], after: dict[str, float],
                   requests: float) -> dict[str, float]:
    """CPU milliseconds per request of each part between two snapshots."""
    count = max(requests, 1.0)
    return {part: round((after[part] - before[part]) * 1000 / count, 3) for part in before}
