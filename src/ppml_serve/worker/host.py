"""A worker process serving every model of its repository view, loading and unloading model
versions in place as administrators ask (through the queue's repository records).

Each served version gets its own batch loop(s) (``Worker``) in threads of this process, over
one loaded engine, so small models do not each cost a process. The host reconciles what it
serves with what is asked every ``poll_s``:

- a model with no request, or whose last request is ``load``, serves the versions its
  version policy picks (the directory is read again at each new load request, and a served
  version whose ``config.yaml``, labels or model file changed is loaded again, as Triton
  does: the new load takes over once its batch loops have joined, the old one then drains;
  if the new load fails, the old one keeps serving and the load reports why);
- ``unload`` (or a version the policy no longer picks) drains: the version is reported
  ``UNLOADING`` so gateways stop sending to it, its batch loops answer everything queued for
  it, and only then stop. A version being replaced stays until its successors are ready.

Every step publishes this host's view (versions present, state of each) for the gateways.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ppml_serve.crypto.tls import server_context
from ppml_serve.errors import PPMLError
from ppml_serve.queue.contract import (
    HostStatus,
    ModelState,
    RepositoryControl,
    VersionState,
    VersionStatus,
    queue_name,
)
from ppml_serve.queue.redis_common import Keys, connect, queue_stats_sync
from ppml_serve.queue.redis_repository import RedisRepositoryControl
from ppml_serve.repository import ModelEntry, Repository
from ppml_serve.settings import Settings
from ppml_serve.worker.metrics import Authorize, WorkerMetrics
from ppml_serve.worker.runner import LoadedVersion, load_version, worker_for
from ppml_serve.worker.service import Worker

log = logging.getLogger("ppml_serve.worker")

QUIET_BEFORE_UNLOAD_S = 1.0
"""How long a draining version's queue must stay empty before its loops stop: longer than
gateways take to see it is no longer ready (they re-read the hosts every 0.5 s)."""


Fingerprint = tuple[str, tuple[str, ...], str, int, int]


def _fingerprint(entry: ModelEntry, version: str) -> Fingerprint:
    """What a served version was loaded from: its config, labels and model file."""
    source = entry.versions[version]
    try:
        stat = source.path.stat()
        mtime, size = stat.st_mtime_ns, stat.st_size
    except OSError:
        mtime = size = -1
    return entry.config.model_dump_json(), entry.labels, str(source.path), mtime, size


@dataclass
class _Served:
    loaded: LoadedVersion
    workers: list[Worker]
    threads: list[threading.Thread]
    fingerprint: Fingerprint | None = None
    draining_since: float | None = None
    empty_since: float | None = None
    predecessor: _Served | None = None
    """The load this one replaces (a reload): it serves until this one's loops have joined."""
    reload_error: str = ""
    """Why the last reload failed (this load kept serving)."""

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def joined(self) -> bool:
        return any(worker.joined for worker in self.workers)


@dataclass
class _ModelView:
    entry: ModelEntry | None = None
    error: str = ""
    serial: int = -1
    failed: dict[str, Exception] = field(default_factory=dict)
    """Versions that failed to load since the last load request, and why."""
    reloading: set[str] = field(default_factory=set)
    """Served versions being loaded again for the last load request."""


Key = tuple[str, str]


def _reason(error: Exception) -> str:
    """What a status may say of a failure: our own messages, else only the kind of error."""
    return str(error) if isinstance(error, PPMLError) else type(error).__name__


class ModelHost:
    def __init__(self, repository: Repository, control: RepositoryControl,
                 load: Callable[[ModelEntry, str], LoadedVersion],
                 start: Callable[[LoadedVersion], Worker],
                 backlog: Callable[[str], int], max_age_s: float, poll_s: float = 0.5,
                 drain_timeout_s: float = 60.0) -> None:
        self._repository = repository
        self._control = control
        self._load = load
        self._start = start
        self._backlog = backlog
        self._max_age_s = max_age_s
        self._poll_s = poll_s
        self._drain_timeout_s = drain_timeout_s
        self.host_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._models: dict[str, _ModelView] = {}
        self._served: dict[Key, _Served] = {}
        self._loading: dict[Key, concurrent.futures.Future[LoadedVersion]] = {}
        self._fingerprints: dict[Key, Fingerprint] = {}
        self._loader = concurrent.futures.ThreadPoolExecutor(1, "model-loader")
        self._stopping = threading.Event()
        self._published_at = float("-inf")

    def ready(self) -> bool:
        """Serving at least one version, and the queue took this host's status lately (a
        readiness probe: a host cut off from Redis, or serving nothing, is not ready)."""
        return (not self._stopping.is_set()
                and time.monotonic() - self._published_at < self._max_age_s
                and any(served.alive() and served.draining_since is None
                        for served in self._served.values()))

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        """Serve until ``stop``; then drain every version (answer what was taken)."""
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception as exc:  # the queue is down: keep serving what is loaded
                log.warning("reconciling models failed (%s); retrying", type(exc).__name__)
            self._stopping.wait(self._poll_s)
        self._shutdown()

    def start(self) -> list[Exception]:
        """The first reconciliation, waiting for its loads; returns the load failures."""
        self.step()
        while self._loading and not self._stopping.is_set():
            concurrent.futures.wait(list(self._loading.values()))
            self.step()
        return [error for view in self._models.values() for error in view.failed.values()]

    def step(self, states: dict[str, ModelState] | None = None) -> None:
        """One reconciliation: read requests, start loads, progress drains, publish."""
        if states is None:
            states = self._control.model_states()
        self._collect_loads()
        names = set(self._repository.names()) | set(self._models) | {k[0] for k in self._served}
        for name in sorted(names):
            self._reconcile(name, states.get(name))
        self._progress_drains()
        self._control.publish_host(self.status(), self._max_age_s)
        self._published_at = time.monotonic()

    def _reconcile(self, name: str, state: ModelState | None) -> None:
        view = self._models.setdefault(name, _ModelView())
        if state is not None and state.action == "unload":
            view.serial = state.serial
            target: list[str] = []
        else:
            serial = state.serial if state is not None else 0
            fresh = serial != view.serial
            if fresh:  # a new load request: read the directory again
                view.serial, view.failed = serial, {}
                try:
                    view.entry, view.error = self._repository.entry(name), ""
                except PPMLError as exc:
                    view.entry, view.error = None, str(exc)
                    log.error("model %r cannot be served: %s", name, exc)
                for key, served in self._served.items():
                    if key[0] == name:
                        served.reload_error = ""
            if view.entry is not None:
                target = view.entry.served_versions()
            else:  # unreadable now (say, a bad config.yaml edit): what serves keeps serving
                target = [key[1] for key, served in self._served.items()
                          if key[0] == name and served.draining_since is None]
        for version in target:
            key = (name, version)
            if key in self._served:
                served = self._served[key]
                if not any(worker.stopping for worker in served.workers):
                    served.draining_since = None  # asked for again before it stopped: keep it
                if fresh and view.entry is not None and key not in self._loading \
                        and served.fingerprint != _fingerprint(view.entry, version):
                    log.info("reloading model %r version %s: its config or model changed",
                             name, version)
                    self._submit_load(view.entry, version)
                    view.reloading.add(version)
            elif key not in self._loading and version not in view.failed \
                    and view.entry is not None:
                log.info("loading model %r version %s", name, version)
                self._submit_load(view.entry, version)
        settled = all((name, v) in self._served or v in view.failed for v in target)
        for key, draining in self._served.items():
            if key[0] == name and key[1] not in target and draining.draining_since is None \
                    and settled:
                log.info("unloading model %r version %s: draining its queue", *key)
                draining.draining_since = time.monotonic()

    def _submit_load(self, entry: ModelEntry, version: str) -> None:
        key = (entry.name, version)
        self._fingerprints[key] = _fingerprint(entry, version)
        self._loading[key] = self._loader.submit(self._load, entry, version)

    def _collect_loads(self) -> None:
        for key, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            fingerprint = self._fingerprints.pop(key, None)
            view = self._models.setdefault(key[0], _ModelView())
            current = self._served.get(key)
            try:
                loaded = future.result()
            except Exception as exc:
                view.reloading.discard(key[1])
                if current is not None:  # a reload: the load that serves goes on serving
                    current.reload_error = _reason(exc)
                    log.error("model %r version %s failed to load again (%s); its previous "
                              "load keeps serving", *key, _reason(exc))
                    continue
                view.failed[key[1]] = exc
                log.error("model %r version %s failed to load: %s", *key, _reason(exc))
                continue
            instances = view.entry.config.instances if view.entry is not None else 1
            workers = [self._start(loaded) for _ in range(instances)]
            threads = [threading.Thread(target=worker.run, daemon=True,
                                        name=f"serve {key[0]}/{key[1]}") for worker in workers]
            for thread in threads:
                thread.start()
            self._served[key] = _Served(loaded, workers, threads, fingerprint,
                                        predecessor=current)
            log.info("model %r version %s is %s", *key, "reloaded" if current else "ready")

    def _progress_drains(self) -> None:
        now = time.monotonic()
        for key, served in self._served.items():
            old = served.predecessor
            if old is not None and (served.joined() or not served.alive()):
                for worker in old.workers:  # its successor takes requests now: drain
                    worker.stop()
                if not old.alive():  # drained: the load request is done
                    served.predecessor = None
                    self._models.setdefault(key[0], _ModelView()).reloading.discard(key[1])
        for key, served in list(self._served.items()):
            if served.draining_since is None:
                if not served.alive():
                    log.error("model %r version %s stopped serving unexpectedly", *key)
                    self._models.setdefault(key[0], _ModelView()).failed[key[1]] = \
                        PPMLError("its batch loop stopped; load the model again")
                    del self._served[key]
                continue
            if served.workers and not served.workers[0].stopping:
                try:
                    empty = self._backlog(queue_name(*key)) == 0
                except Exception:  # cannot tell: keep serving
                    empty = False
                served.empty_since = (served.empty_since or now) if empty else None
                quiet = served.empty_since is not None \
                    and now - served.empty_since >= QUIET_BEFORE_UNLOAD_S
                if quiet or now - served.draining_since > self._drain_timeout_s:
                    for worker in served.workers:
                        worker.stop()
            if not served.alive():
                del self._served[key]
                log.info("model %r version %s unloaded", *key)

    def status(self) -> HostStatus:
        versions: dict[str, dict[str, VersionStatus]] = {}
        errors: dict[str, str] = {}
        for name, view in self._models.items():
            if view.error:
                errors[name] = view.error
            states = versions.setdefault(name, {})
            for version, error in view.failed.items():
                states[version] = VersionStatus(VersionState.UNAVAILABLE, _reason(error))
        for (name, version), _ in self._loading.items():
            versions.setdefault(name, {})[version] = VersionStatus(VersionState.LOADING)
        for (name, version), served in self._served.items():
            reason = ""
            if served.draining_since is not None:
                state = VersionState.UNLOADING
            elif served.joined() or served.predecessor is not None:
                state = VersionState.READY
                if served.reload_error:
                    reason = (f"loading it again failed ({served.reload_error}); its "
                              "previous load still serves")
            else:  # started, not yet announced: a request now would find no spec
                state = VersionState.LOADING
            versions.setdefault(name, {})[version] = VersionStatus(state, reason)
        try:
            available = self._repository.available()
        except OSError:
            available = {}
        # a load request is reported done only once its reloads have finished
        serials = {name: view.serial - 1 if view.reloading else view.serial
                   for name, view in self._models.items()}
        return HostStatus(self.host_id, time.time(), available, versions, errors, serials)

    def _shutdown(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        every = [*self._served.values(),
                 *(s.predecessor for s in self._served.values() if s.predecessor)]
        for served in every:
            for worker in served.workers:
                worker.stop()
        for served in every:
            for thread in served.threads:
                thread.join()
        try:
            self._control.forget_host(self.host_id)
        except Exception as exc:  # the queue is down: our entry goes stale by itself
            log.warning("could not remove this host's status (%s)", type(exc).__name__)


def build_host(settings: Settings, repository: Repository,
               metrics_authorize: Authorize | None = None) -> ModelHost:
    """A host serving ``repository`` against the configured queue and key broker;
    ``metrics_authorize`` guards its metrics port (``worker.metrics_auth``)."""
    keys = Keys(settings.redis.prefix)
    client = connect(settings.redis_url(), settings.ca_file, settings.redis.cluster)
    metrics = WorkerMetrics()

    def load(entry: ModelEntry, version: str) -> LoadedVersion:
        return load_version(settings, entry.name, version, entry.versions[version],
                            entry.config, entry.labels)

    def backlog(queue: str) -> int:
        return queue_stats_sync(client, keys, queue, settings.worker.dead_after_s).depth

    host = ModelHost(repository, RedisRepositoryControl(client, keys), load,
                     lambda loaded: worker_for(settings, loaded, metrics), backlog,
                     settings.worker.dead_after_s,
                     drain_timeout_s=settings.gateway.request_timeout_s)
    if settings.worker.metrics_port is not None:
        metrics.serve(settings.worker.metrics_port, settings.worker.metrics_host, host.ready,
                      server_context(settings.server_cert_file, settings.server_key_file)
                      if settings.worker.metrics_tls else None,
                      metrics_authorize)
    return host

