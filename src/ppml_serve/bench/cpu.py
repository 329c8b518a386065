"""CPU time per part of a local stack (from /proc), for costs per request."""

from __future__ import annotations

import os
from pathlib import Path

from ppml_serve.local_stack import Child, LocalStack

_TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("gateway", "redis", "worker")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


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
    return {part: sum(cpu_seconds(pid) for pid in ids) for part, ids in pids.items()}


def per_request_ms(before: dict[str, float], after: dict[str, float],
                   requests: float) -> dict[str, float]:
    """CPU milliseconds per request of each part between two snapshots."""
    count = max(requests, 1.0)
    return {part: round((after[part] - before[part]) * 1000 / count, 3) for part in before}
