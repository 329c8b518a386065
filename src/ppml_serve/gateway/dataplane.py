"""What the gateway knows of its models, free of HTTP: the versions it routes to and their
specs, readiness, the repository's records, and the route table the native front answers
inference from (``native_path.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ppml_serve import _native
from ppml_serve.codecs.tensors import ModelSpec
from ppml_serve.crypto.envelope import SPEC, ModelSealers, Sealer, associated_data
from ppml_serve.disk import DiskWatch
from ppml_serve.errors import (
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    ProtocolError,
)
from ppml_serve.gateway.repository import RepositoryView
from ppml_serve.queue.contract import (
    VERSION_PATTERN,
    GatewayBroker,
    Presence,
    QueueStats,
    Registry,
    RequestQueue,
    VersionState,
    queue_name,
    split_queue_name,
)
from ppml_serve.settings import GatewaySettings

log = logging.getLogger("ppml_serve.gateway")

WATCH_INTERVAL_S = 0.5
"""How often waiting requests are checked against the live workers of their model."""
REPOSITORY_TTL_S = 0.5
"""How long the merged view of the worker hosts is reused (hot path: version routing)."""

@dataclass(frozen=True)
class Closure:
    """Why a version takes no requests now: the error each gets once its input is checked
    (the front checks it first); ``recheck``: it is for want of a live worker, and one
    that comes opens the version at once."""

    error: NotReady | Overloaded
    recheck: bool = False


Routed = tuple[ModelSpec, Closure | None]
"""A version on the native path: its spec, and what its requests get while it is closed."""


@dataclass(frozen=True)
class ModelRoutes:
    """One model as the native front routes it (``DataPlane.route_table``)."""

    default: str
    """The version an unversioned request goes to (``resolve``'s choice)."""
    known: list[str]
    """Every version ``resolve`` knows, newest first (an unknown one's 404 lists them)."""
    versions: dict[str, Routed]
    """The known versions whose spec the gateway holds."""
    pending: dict[str, NotReady]
    """The others (no worker has announced their spec: loading, or not loaded), with the
    error their requests get."""


RouteTable = dict[str, ModelRoutes]
"""Every model ``resolve`` knows (configured, on a host, or announced by a worker): what is
announced or asked for after it was built, the front finds in Redis and asks for it anew."""


class NativeRequests(Protocol):
    """The requests the native front's inference path holds (``gateway/native_path.py``):
    counted for the metrics, failed when a model's last worker dies."""

    def waiting_queues(self) -> list[str]: ...

    def plane_inflight(self) -> dict[str, int]: ...

    def fail_waiting(self, queue: str, message: str) -> int: ...


@dataclass
class _Cached:
    value: Any
    expires: float


class DataPlane:
    """One per gateway process.

    Public methods take a model's name and version (``None``: the newest ready version);
    below them everything is keyed by the version's queue name (``queue_name``)."""

    def __init__(self, broker: GatewayBroker, sealer: ModelSealers, settings: GatewaySettings,
                 worker_max_age_s: float, configured_models: set[str] | None = None,
                 max_rows: int | None = None, disk: DiskWatch | None = None) -> None:
        """``max_rows``: the rows one request may carry (its configuration shows it)."""
        self._broker = broker  # connection only (ping, close); the roles below use it too
        self._queue: RequestQueue = broker
        self._presence: Presence = broker
        self._registry: Registry = broker
        self._disk = disk
        self._sealers = sealer
        self._settings = settings
        self._worker_max_age_s = worker_max_age_s
        self._cache: dict[str, _Cached] = {}
        self._loading: dict[str, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._configured = configured_models or set()
        self._max_rows = max_rows
        self._announced: dict[str, dict[str, Any]] = {}
        self._native_inputs: dict[str, tuple[ModelSpec, _native.ModelInputs]] = {}
        self._native: NativeRequests | None = None

    async def start(self) -> None:
        """Start even while Redis is down: readiness reports it, requests get 503."""
        try:
            await self._broker.ping()
        except NotReady as exc:
            log.warning("starting without the queue (%s); will keep trying", exc)
        self._tasks = [asyncio.create_task(self._watch_workers(), name="worker-watch")]

    @property
    def worker_max_age_s(self) -> float:
        """A worker whose last heartbeat is older than this is not live."""
        return self._worker_max_age_s

    def _sealer_of(self, queue: str) -> Sealer:
        """Records of every version of a model are sealed under that model's keys."""
        return self._sealers.for_model(split_queue_name(queue)[0])

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._broker.close()

    async def forget_streams(self, streams: set[str]) -> None:
        """Delete reply streams the native front read (at shutdown)."""
        await self._broker.delete_streams(streams)

    def attach_native(self, native: NativeRequests) -> None:
        """Count and watch the native front's requests."""
        self._native = native

    def disk_free(self) -> dict[str, int]:
        """Free bytes of the watched volumes, by directory."""
        return self._disk.free_bytes() if self._disk is not None else {}

    def inflight(self) -> dict[str, int]:
        """Requests waiting for their answer in the native front, by version's queue."""
        return self._native.plane_inflight() if self._native is not None else {}

    async def queue_stats(self) -> dict[str, QueueStats]:
        """Queue depth, lag, pending and live workers of every served model."""
        models = set(self._configured)
        cached = self._cache.get("models")
        if cached is not None:
            models |= set(cached.value)
        return {model: await self._presence.queue_stats(model, self._worker_max_age_s)
                for model in sorted(models)}

    async def _watch_workers(self) -> None:
        """Requests for a model whose last worker died get 503 now, not 504 later (if a new
        worker comes up in time, it answers them instead)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self._native is None:
                continue
            for model in set(self._native.waiting_queues()):
                try:
                    live = await self._presence.live_workers(model, self._worker_max_age_s)
                except NotReady:
                    continue  # the front's reply readers handle a lost queue
                self._cache[f"ready:{model}"] = _Cached(live > 0,
                                                        time.monotonic() + WATCH_INTERVAL_S)
                if live == 0:
                    log.warning("model %r has no live worker: failing its waiting requests",
                                model)
                    # the words of a refused request
                    self._native.fail_waiting(model, str(_no_live_worker(model)))

    async def _cached(self, key: str, ttl_s: float, load: Callable[[], Awaitable[Any]]) -> Any:
        """``load()``'s value, reused for ``ttl_s``. Concurrent callers of an expired key
        share one load: under load, every request would otherwise ask Redis again."""
        entry = self._cache.get(key)
        if entry is not None and entry.expires >= time.monotonic():
            return entry.value
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load_into_cache(key, ttl_s, load))
            self._loading[key] = pending
            # callers all gone: the error is theirs to see, not the loop's to log
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        # shielded: one caller cancelled (a client gone) must not fail the others
        return await asyncio.shield(pending)

    async def _load_into_cache(self, key: str, ttl_s: float,
                               load: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await load()
            self._cache[key] = _Cached(value, time.monotonic() + ttl_s)
            return value
        finally:
            del self._loading[key]

    async def models(self, refresh: bool = False) -> dict[str, ModelSpec]:
        """Specs announced by workers, by queue name."""
        if refresh:
            self._cache.pop("models", None)

        async def load() -> dict[str, ModelSpec]:
            table = await self._presence.models()
            self._announced = {}
            for queue, sealed in table.items():
                try:
                    spec = self._sealer_of(queue).open(sealed, associated_data(queue, "", SPEC))
                    self._announced[queue] = json.loads(spec)
                except (IntegrityError, ProtocolError, ValueError):
                    # not sealed with our keys, or altered in Redis: not a model we serve
                    log.warning("ignoring model %r: its announced spec does not open with "
                                "this gateway's keys (altered, or another deployment's)", queue)
            return {queue: ModelSpec.from_json(document)
                    for queue, document in self._announced.items()}

        result: dict[str, ModelSpec] = await self._cached("models", 2.0, load)
        return result

    async def repository(self, refresh: bool = False) -> RepositoryView:
        """The merged view of every live worker host (cached briefly)."""
        if refresh:
            self._cache.pop("repository", None)

        async def load() -> RepositoryView:
            return RepositoryView(await self._registry.host_statuses(self._worker_max_age_s))

        view: RepositoryView = await self._cached("repository", REPOSITORY_TTL_S, load)
        return view

    def is_served(self, model: str) -> bool:
        """Whether ``model`` is configured here or was announced by a worker (no I/O)."""
        if model in self._configured:
            return True
        cached = self._cache.get("models")
        if cached is not None and any(split_queue_name(q)[0] == model for q in cached.value):
            return True
        view = self._cache.get("repository")
        return view is not None and view.value.knows(model)

    async def resolve(self, model: str, version: str | None) -> str:
        """The version a request for ``model`` (and ``version``, if given) goes to: the
        newest ready one by default. Unknown models and versions are ``ModelNotFound``."""
        view = await self.repository()
        if version is None:
            ready = view.ready_versions(model)
            if ready:
                return ready[0]
        elif not VERSION_PATTERN.fullmatch(version):
            raise ModelNotFound(f"model {model!r} has no version {version[:12]!r} "
                                "(versions are positive integers)")
        known = await self._versions_known(model, view)
        if not known:
            raise ModelNotFound(f"model {model!r} is not served here")
        if version is None:
            return known[0]
        if version not in known:
            raise ModelNotFound(f"model {model!r} has no version {version!r} "
                                f"(versions: {', '.join(reversed(known))})")
        return version

    async def _versions_known(self, model: str, view: RepositoryView) -> list[str]:
        """Versions of ``model`` newest first: from the hosts' views, else version 1 when
        the model is configured or announced by a worker without repository records (or a
        stand-in in tests)."""
        if view.knows(model):
            return view.present(model)
        if model in self._configured:
            return ["1"]
        models = await self.models()
        announced = model in models or model in await self.models(refresh=True)
        return ["1"] if announced else []

    async def spec(self, model: str, version: str = "1") -> ModelSpec:
        return await self._spec_of(queue_name(model, version))

    async def _spec_of(self, queue: str) -> ModelSpec:
        models = await self.models()
        if queue not in models:
            models = await self.models(refresh=True)
        if queue not in models:
            model, _ = split_queue_name(queue)
            if model in self._configured or (await self.repository()).knows(model):
                raise _unannounced(queue)
            raise ModelNotFound(f"model {model!r} is not served here")
        return models[queue]

    async def versions(self, model: str, version: str) -> list[str]:
        """The versions of ``model`` that serve now (or the one asked about)."""
        ready = (await self.repository()).ready_versions(model)
        return list(reversed(ready)) if ready else [version]

    async def model_config(self, model: str, version: str) -> dict[str, Any]:
        """The model's configuration in Triton's shape (``get_model_config``)."""
        spec = await self.spec(model, version)
        announced = self._announced.get(queue_name(model, version), {})

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": f"TYPE_{t.datatype}",
                     "dims": list(t.shape[1:] if t.shape and t.shape[0] == -1 else t.shape)}
                    for t in specs]

        delay_us = int(float(announced.get("max_batch_delay_ms", 0)) * 1000)
        parameters = {"labels": {"string_value": json.dumps(announced.get("labels", []))}}
        warmup: list[dict[str, Any]] = []
        if isinstance(announced.get("warmup"), dict):  # what the worker ran before READY
            ran = announced["warmup"]
            data = "random_data" if ran.get("data") == "random" else "zero_data"
            warmup = [{"name": "config.yaml warmup", "batch_size": int(ran.get("batch_size", 1)),
                       "count": int(ran.get("runs", 1)),
                       "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"],
                                              data: True} for t in tensors(spec.inputs)}}]
            parameters["warmup_seconds"] = {"string_value": str(ran.get("seconds", ""))}
        return {"name": spec.name, "platform": f"{spec.platform}_onnx"
                if spec.platform == "onnxruntime" else spec.platform,
                "backend": spec.platform,
                # Rows one request may carry (Triton's meaning); requests per engine batch
                # are the dynamic batcher's concern.
                "max_batch_size": self._max_rows or 0,
                "input": tensors(spec.inputs), "output": tensors(spec.outputs),
                "version_policy": announced.get("version_policy",
                                                {"specific": {"versions": [int(version)]}}),
                "instance_group": [{"count": int(announced.get("instances", 1)),
                                    "kind": "KIND_CPU"}],
                "dynamic_batching": {"max_queue_delay_microseconds": delay_us,
                                     "max_requests_per_batch": int(
                                         announced.get("max_batch_size", 0))},
                "model_warmup": warmup,
                "parameters": parameters}

    async def repository_index(self) -> list[dict[str, str]]:
        """Every model and version the worker hosts hold, with state (repository API)."""
        view = await self.repository(refresh=True)
        index = view.index()
        for model in sorted(self._configured | {split_queue_name(q)[0]
                                                for q in await self.models(refresh=True)}):
            if view.knows(model):
                continue
            try:
                ready = await self.model_ready(model, "1")
            except (ModelNotFound, NotReady):
                ready = False
            index.append({"name": model, "version": "1",
                          "state": "READY" if ready else "UNAVAILABLE", "reason": ""})
        return index

    async def change_model(self, model: str, action: str, timeout_s: float) -> None:
        """Ask every worker host to load (read again and serve) or unload (drain, then
        stop) ``model``, and wait until they have. A load that leaves no version ready
        raises ``InvalidInput`` with the hosts' reasons."""
        view = await self.repository(refresh=True)
        if not view.knows(model):  # hosts list their directories every poll (0.5 s)
            raise ModelNotFound(
                f"model {model[:64]!r} is in no worker's repository: put its directory in "
                "the workers' model repository and allow it with 'ppml-serve model add "
                "REPOSITORY NAME' (which adds its measurement to the key broker's policy), "
                "then load it")
        state = await self._registry.request_model_state(model, action)
        log.info("model %r: %s requested (serial %d)", model, action, state.serial)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            view = await self.repository(refresh=True)
            if view.settled(model, state.serial):
                break
        else:
            raise DeadlineExceeded(f"model {model!r}: the {action} did not finish within "
                                   f"{timeout_s:g} s; see the repository index")
        if action != "load":
            return
        # Any version that failed fails the load (as Triton's does), even while others serve:
        # a 200 would tell the caller the new version is there when it is not.
        failures = view.failures(model)
        ready = view.ready_versions(model)
        if failures or not ready:
            reasons = "; ".join(failures) or "no version to serve"
            serving = (f" (still serving: version {', '.join(reversed(ready))})"
                       if ready else "")
            raise InvalidInput(f"model {model!r} could not be loaded: {reasons}{serving}")

    async def model_ready(self, model: str, version: str) -> bool:
        queue = queue_name(model, version)
        await self._spec_of(queue)
        return await self._queue_ready(queue)

    @staticmethod
    def _state_serves(view: RepositoryView, queue: str) -> bool:
        """Whether the hosts' records let ``queue`` serve (once it has live workers)."""
        model, version = split_queue_name(queue)
        state = view.states(model).get(version)
        # draining for an unload, failed, or not loaded: no; LOADING: ready once its
        # workers are live (hosts report READY up to a poll later)
        return not view.knows(model) or (
            state is not None and state.state in (VersionState.READY, VersionState.LOADING))

    async def _queue_ready(self, queue: str) -> bool:
        if not self._state_serves(await self.repository(), queue):
            return False

        async def load() -> bool:
            return await self._presence.live_workers(queue, self._worker_max_age_s) > 0

        ready: bool = await self._cached(f"ready:{queue}", 0.5, load)
        if not ready:
            # only a yes is reused: workers that just came are served at once, not after
            # a "none" cached by the native path's refresh (or a request) just before
            self._cache.pop(f"ready:{queue}", None)
        return ready

    async def ready(self) -> bool:
        """Redis answers, the state volume has room, every configured model has a ready
        version, and some model does."""
        if self._disk is not None and self._disk.shortage() is not None:
            return False
        try:
            await self._broker.ping()
            view = await self.repository()
            names = self._configured | view.names() | {
                split_queue_name(q)[0] for q in await self.models()}
            ready = set()
            for name in names:
                try:
                    if await self.model_ready(name, await self.resolve(name, None)):
                        ready.add(name)
                except (ModelNotFound, NotReady):
                    continue
            return bool(ready) and self._configured <= ready
        except NotReady:
            return False

    async def route_table(self, fresh: bool = False) -> RouteTable:
        """For the native front's inference path: every model ``resolve`` knows, with the
        version an unversioned request goes to, its known versions, and for each the spec
        (with the ``Closure`` its requests get now, if any: the checks the front makes, in
        its order — the state volume short of room, no live worker, backlog over its bound)
        or, with no spec announced, the error its requests get. ``fresh``: read the specs and
        the hosts' view anew (the front found one newer than its routes)."""
        shortage = self._disk.shortage() if self._disk is not None else None
        view = await self.repository(refresh=fresh)
        specs = await self.models(refresh=fresh)
        names = self._configured | view.names() | {split_queue_name(q)[0] for q in specs}
        table: RouteTable = {}
        for name in sorted(names):
            known = await self._versions_known(name, view)
            if not known:
                continue
            versions: dict[str, Routed] = {}
            pending: dict[str, NotReady] = {}
            for version in known:
                queue = queue_name(name, version)
                ready = await self._queue_ready(queue)
                if queue not in specs and ready:  # live workers: their spec is newer
                    specs = await self.models(refresh=True)
                spec = specs.get(queue)
                if spec is None:  # judged before the closures, as the Python path judged it
                    pending[version] = _unannounced(queue)
                    continue
                closure: Closure | None = None
                if shortage is not None:  # the disk's words (its free space, read each second)
                    closure = Closure(NotReady(shortage))
                elif not ready:
                    # the app's words; while the hosts let it serve, a worker that comes
                    # before the next refresh opens it (the front counts live ones itself)
                    closure = Closure(_no_live_worker(queue),
                                      recheck=self._state_serves(view, queue))
                else:
                    try:
                        await self._check_backlog(queue)
                    except Overloaded as exc:
                        closure = Closure(exc)
                versions[version] = (spec, closure)
            table[name] = ModelRoutes(await self.resolve(name, None), known, versions, pending)
        return table

    async def _check_backlog(self, model: str) -> None:
        backlog: int = await self._cached(f"backlog:{model}", 0.1,
                                          lambda: self._queue.backlog(model))
        if backlog >= self._settings.max_queue_length:
            raise Overloaded(f"model {model!r} has {backlog} queued requests; retry later")

    def native_inputs(self, queue: str, spec: ModelSpec) -> _native.ModelInputs:
        """The native form of a version's declared inputs, made once per announced spec."""
        known = self._native_inputs.get(queue)
        if known is None or known[0] is not spec:
            known = (spec, _native.ModelInputs(
                spec.name, [(t.name, t.datatype, list(t.shape)) for t in spec.inputs]))
            self._native_inputs[queue] = known
        return known[1]

    def labels(self, queue: str) -> list[str] | None:
        """The class names a worker announced for the version (``labels`` in its config)."""
        labels = self._announced.get(queue, {}).get("labels")
        return [str(label) for label in labels] if isinstance(labels, list) else None

    async def attestations(self, model: str, version: str) -> list[dict[str, Any]]:
        queue = queue_name(model, version)
        await self._spec_of(queue)
        return [json.loads(item) for item in await self._presence.attestations(queue)]

def _unannounced(queue: str) -> NotReady:
    model, version = split_queue_name(queue)
    return NotReady(f"model {model!r} version {version} has no worker that holds its keys "
                    "(not loaded, or still loading)")


def _no_live_worker(queue: str) -> NotReady:
    model, version = split_queue_name(queue)
    return NotReady(f"model {model!r} version {version} has no live worker")

