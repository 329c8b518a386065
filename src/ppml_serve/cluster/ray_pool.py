"""A model's workers as a pool of Ray actors, sized from the queue's backlog.

Each actor is a full worker: it attests and obtains its own keys on its node, reads its
credentials from that node's state directory (the operator distributes them as for any worker
machine: nothing secret travels through Ray), and joins the model's consumer group. Ray places
actors (``num_cpus``, ``num_gpus``) and restarts them when they or their node die
(``max_restarts``); the queue's heartbeat liveness hands a dead actor's requests to the others
at once. The driver's autoscaler keeps the pool between ``min_replicas`` and ``max_replicas``:
one replica per ``target_backlog`` requests not yet answered (waiting or taken by a worker:
lag + pending, which closed-loop clients drive as much as a queue does), with cool-downs;
surplus actors are drained (they answer what they hold, then leave). On KubeRay, actors that
cannot be placed make Ray's own autoscaler add nodes.

Ray is optional: ``pip install ppml-serve[ray]``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.queue.contract import QueueStats

log = logging.getLogger("ppml_serve.ray")


def queue_stats_source(settings: Any, model: str) -> Callable[[], QueueStats]:
    """Reads the model's queue statistics from Redis (the driver needs only the URL)."""
    from ppml_serve.queue.redis_common import Keys, connect, queue_stats_sync

    client = connect(settings.redis_url(), settings.ca_file, settings.redis.cluster)
    keys = Keys(settings.redis.prefix)
    return lambda: queue_stats_sync(client, keys, model, settings.worker.dead_after_s)


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'ppml-serve[ray]'") from None
    return ray


@dataclass(frozen=True)
class PoolSpec:
    """What to run and how far it may grow."""

    model: str
    model_path: Path
    config_file: Path | None = None
    """Settings of the workers (each node reads it, and its state directory, locally)."""
    state_dir: Path | None = None
    min_replicas: int = 1
    max_replicas: int = 4
    target_backlog: int = 16
    """Requests not yet answered (lag + pending) per replica the pool aims for."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = -1
    """How often Ray restarts a dead actor (-1: always)."""
    scale_up_cooldown_s: float = 5.0
    scale_down_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError("--min-replicas/--max-replicas: need 0 <= min <= max, max >= 1")
        if self.target_backlog < 1:
            raise ConfigError("--target-backlog: must be at least 1")


@dataclass
class Autoscaler:
    """The replica count for a backlog: ``ceil((lag + pending) / target_backlog)``, kept
    within bounds; grows at most once per up cool-down, shrinks only after the down
    cool-down without growth."""

    spec: PoolSpec
    clock: Callable[[], float] = time.monotonic
    _last_change: float = field(default=float("-inf"), init=False)

    def desired(self, current: int, stats: QueueStats) -> int:
        wanted = math.ceil(stats.backlog / self.spec.target_backlog)
        wanted = max(self.spec.min_replicas, min(self.spec.max_replicas, wanted))
        now = self.clock()
        if wanted > current and now - self._last_change >= self.spec.scale_up_cooldown_s:
            self._last_change = now
            return wanted
        if wanted < current and now - self._last_change >= self.spec.scale_down_cooldown_s:
            self._last_change = now
            return wanted
        return current


class WorkerActor:
    """Body of the Ray actor: one worker running in a thread of the actor's process."""

    def __init__(self, model: str, model_path: str, config_file: str | None,
                 state_dir: str | None) -> None:
        from ppml_serve.logs import configure_logging
        from ppml_serve.settings import load_settings
        from ppml_serve.worker.runner import build_worker

        overrides: dict[str, Any] = {"state_dir": Path(state_dir)} if state_dir else {}
        settings = load_settings(Path(config_file) if config_file else None, **overrides)
        configure_logging("WARNING", settings.log.format)
        self._worker = build_worker(settings, model, Path(model_path))
        self._thread = threading.Thread(target=self._worker.run, name="worker", daemon=True)
        self._thread.start()

    def node_id(self) -> str:
        return str(ray_module().get_runtime_context().get_node_id())

    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self) -> bool:
        """Stop taking requests, answer those taken, leave the group."""
        self._worker.stop()
        self._thread.join(60)
        return not self._thread.is_alive()


class RayWorkerPool:
    """The driver's side: actors of one model, scaled from the queue's backlog."""

    def __init__(self, spec: PoolSpec, stats: Callable[[], QueueStats]) -> None:
        self.spec = spec
        self._stats = stats
        self._actor_class = ray_module().remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                          max_restarts=spec.max_restarts)(WorkerActor)
        self.actors: list[Any] = []
        self.autoscaler = Autoscaler(spec)

    def scale_to(self, replicas: int) -> None:
        ray = ray_module()
        while len(self.actors) < replicas:
            self.actors.append(self._actor_class.remote(
                self.spec.model, str(self.spec.model_path),
                str(self.spec.config_file) if self.spec.config_file else None,
                str(self.spec.state_dir) if self.spec.state_dir else None))
        surplus = self.actors[replicas:]
        self.actors = self.actors[:replicas]
        if surplus:
            # Drain before killing: each answers what it holds, so scale-down loses nothing.
            try:
                ray.get([actor.drain.remote() for actor in surplus], timeout=120)
            except Exception as exc:  # a dead actor holds nothing: the queue reclaims it
                log.warning("draining failed (%s); removing the actors anyway",
                            type(exc).__name__)
            for actor in surplus:
                ray.kill(actor, no_restart=True)
        log.info("model %r: %d replica(s)", self.spec.model, len(self.actors))

    def step(self) -> int:
        """One autoscaling decision; returns the replica count."""
        try:
            stats = self._stats()
        except NotReady as exc:
            log.warning("queue statistics unavailable (%s); keeping %d replica(s)", exc,
                        len(self.actors))
            return len(self.actors)
        wanted = self.autoscaler.desired(len(self.actors), stats)
        if wanted != len(self.actors):
            log.info("model %r: lag %d, pending %d -> %d replica(s)", self.spec.model,
                     stats.lag, stats.pending, wanted)
            self.scale_to(wanted)
        return len(self.actors)

    def nodes(self) -> list[str]:
        return list(ray_module().get([actor.node_id.remote() for actor in self.actors], timeout=60))

    def run(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        self.scale_to(self.spec.min_replicas)
        while not stop.wait(poll_s):
            self.step()
        self.scale_to(0)
