"""Per-model inference statistics in Triton's shape (``GET /v2/models/{m}/stats``), as this
gateway saw them: counts and nanoseconds of successes, failures, queue wait and engine time."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ppml_serve.queue.contract import split_queue_name


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _ModelStats:
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    batches: dict[int, _Duration] = field(default_factory=lambda: defaultdict(_Duration))
    last_inference_ms: int = 0


class InferenceStatistics:
    """Fed by the gateway (outcomes) and by the workers' answers (queue and engine time),
    per model version (keyed by queue name)."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelStats] = defaultdict(_ModelStats)
        self._lock = threading.Lock()

    def outcome(self, model: str, ok: bool, seconds: float) -> None:
        with self._lock:
            stats = self._models[model]
            (stats.success if ok else stats.fail).add(seconds)
            stats.last_inference_ms = int(time.time() * 1000)

    def answer(self, model: str, queue_s: float, engine_s: float, batch_size: int) -> None:
        with self._lock:
            stats = self._models[model]
            stats.queue.add(queue_s)
            stats.compute_infer.add(engine_s)
            stats.batches[batch_size].add(engine_s)

    def queues(self) -> set[str]:
        """Model versions (queue names) with statistics so far."""
        with self._lock:
            return set(self._models)

    def rows(self, queues: Iterable[str]) -> list[dict[str, Any]]:
        """Triton's ``model_stats`` entries of these model versions, in name order."""
        return [row for queue in sorted(queues) for row in self.as_json(queue)["model_stats"]]

    def as_json(self, queue: str) -> dict[str, Any]:
        """Statistics of one model version (by its queue name)."""
        model, version = split_queue_name(queue)
        with self._lock:
            stats = self._models.get(queue, _ModelStats())
            empty = _Duration().as_json()
            return {"model_stats": [{
                "name": model, "version": version,
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.success.count,
                "execution_count": stats.compute_infer.count,
                "inference_stats": {
                    "success": stats.success.as_json(), "fail": stats.fail.as_json(),
                    "queue": stats.queue.as_json(), "compute_input": empty,
                    "compute_infer": stats.compute_infer.as_json(), "compute_output": empty},
                "batch_stats": [{"batch_size": size, "compute_input": empty,
                                 "compute_infer": duration.as_json(),
                                 "compute_output": empty}
                                for size, duration in sorted(stats.batches.items())],
            }]}
