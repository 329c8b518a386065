"""Keeps the native front's inference path in step with this gateway (issue 20).

The front answers ``POST /v2/models/{m}[/versions/{v}]/infer`` itself (ppml-front's
``plane``: key check, admission, seal, spool or XADD, its own reply readers, the answer
opened and encoded) for what this module installs, every ``REFRESH_S``:

- the routes (``DataPlane.route_table``): per model the app knows, the version an
  unversioned request goes to, its known versions (any other is refused 404, in the app's
  words), and each known version's spec with its streams, declared tensors, keyring and
  associated data — and, while it takes no requests (the state volume short of room, no
  live worker, backlog over its bound: the checks the app's path makes), the error its
  requests get once their input is checked — or, where no worker has announced its spec,
  the 503 its requests get. A model not among them is refused 404;
- while Redis does not answer those checks: the 503 every request gets, in the app's words;
- the callers: every key of the key file (whether it may call inference, and which
  models), reloaded as the app reloads them: the front refuses a missing or unknown key
  (401) and one that may not call the model (403) itself, in the app's words.

Where the front finds in Redis a model or spec newer than its routes (announced, or asked
to be loaded, since), it asks for them rebuilt from fresh reads and waits for that. Every
request the front answered comes back here as an event, for the app's metrics, statistics
and access log: one implementation of those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ppml_serve import _native
from ppml_serve.crypto.envelope import (
    REPLY,
    REQUEST,
    ModelSealers,
    PlaintextSealer,
    associated_data,
)
from ppml_serve.errors import NotReady
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.gateway.dataplane import Closure, DataPlane, RouteTable
from ppml_serve.gateway.errors import status_of
from ppml_serve.queue.contract import queue_name
from ppml_serve.queue.redis_common import Keys
from ppml_serve.tracing import NativeSpan

log = logging.getLogger("ppml_serve.gateway")

REFRESH_S = 0.1
"""How often routes and callers are rebuilt, and answered requests collected: the same
staleness as the app's own cached checks (backlog 0.1 s, live workers 0.5 s)."""
CHECK_TIMEOUT_S = 1.0
"""Longest a refresh waits for its checks (Redis stalled): then every request gets 503
until they answer again."""
_ID_MARK = "ppml-request-id"


@dataclass(frozen=True)
class Answered:
    """A request the native front answered."""

    model: str
    version: str
    queue: str
    path: str
    status: int
    seconds: float
    key_name: str
    request_id: str
    caller_id: str
    client: str
    bytes_in: int
    bytes_out: int
    answer: tuple[int, float, float] | None
    """The worker's batch size, queue wait and engine seconds (a successful answer)."""
    failure: str | None
    """For a 500: what went wrong, for the error log."""
    trace: tuple[str, str | None, list[NativeSpan]] | None = None
    """Its trace id, the caller's span id and the gateway's spans (tracing on, sampled)."""

    @classmethod
    def of(cls, event: Any) -> Answered:
        (model, version, queue, path, status, seconds), \
            (key, rid, caller, client, bytes_in, bytes_out), answer, failure, trace = event
        return cls(model, version, queue, path, status, seconds, key, rid, caller, client,
                   bytes_in, bytes_out, answer, failure, trace)


def _around_id(aad: bytes) -> tuple[bytes, bytes]:
    """Associated data split around its request id (the front puts its own in between)."""
    head, _, tail = aad.partition(_ID_MARK.encode())
    return head, tail


class NativePath:
    """Owned by the gateway process; ``serve`` runs it beside the app."""

    def __init__(self, front: _native.Front, dataplane: DataPlane, keys: ApiKeyStore,
                 sealers: ModelSealers, layout: Keys, gateway_id: str,
                 tracing: Callable[[], float | None] = lambda: None) -> None:
        """``tracing``: the sample ratio of new traces while tracing is on (the front then
        times the gateway's spans)."""
        self._front = front
        self._dataplane = dataplane
        self._keys = keys
        self._sealers = sealers
        self._layout = layout
        self._gateway_id = gateway_id
        self._tracing = tracing
        self._ratio: float | None = None
        self._callers: list[tuple[bytes, str, list[str] | None, str, bool]] | None = None
        self._streams: set[str] = set()
        self.on_answered: Callable[[Answered], None] = lambda answered: None

    def reply_stream(self, queue: str) -> str:
        return self._layout.replies(queue, self._gateway_id)

    def _closed(self, queue: str, closure: Closure | None) -> tuple[Any, ...] | None:
        """A closure as the front takes it: status, words, and where to count live workers
        (the key of their heartbeats, and the age within which one is live)."""
        if closure is None:
            return None
        recheck = (self._layout.workers(queue), self._dataplane.worker_max_age_s) \
            if closure.recheck else None
        return status_of(closure.error).http, str(closure.error), recheck

    def _version_spec(self, queue: str, spec: Any, closure: Closure | None) -> tuple[Any, ...]:
        model = queue.partition("@")[0]
        sealer = self._sealers.for_model(model)
        keyring = getattr(sealer, "native", None)
        if keyring is None and not isinstance(sealer, PlaintextSealer):
            raise TypeError(f"the sealer of model {model!r} holds no native keyring")
        # None for the plaintext benchmark mode: the front marks plain records as it does
        stream = self.reply_stream(queue)
        self._streams.add(stream)
        return ((queue, self._layout.requests(queue), stream, self._layout.job(queue, "")),
                self._dataplane.native_inputs(queue, spec),
                ([(output.name, output.datatype, list(output.shape))
                  for output in spec.outputs], self._dataplane.labels(queue)),
                keyring,
                _around_id(associated_data(queue, _ID_MARK, REQUEST)),
                _around_id(associated_data(queue, _ID_MARK, REPLY)),
                self._closed(queue, closure))

    async def refresh(self) -> None:
        """Install what the front may serve now, and collect what it answered."""
        callers = self._keys.front_callers()
        if callers != self._callers:
            self._front.set_callers(callers)
            self._callers = callers
        found: RouteTable | None = None
        outage: str | None = None
        try:
            found = await asyncio.wait_for(
                self._dataplane.route_table(fresh=self._front.take_stale()), CHECK_TIMEOUT_S)
        except NotReady as exc:  # Redis unreachable
            outage = str(exc)
        except asyncio.TimeoutError:
            outage = f"redis not reachable: no answer within {CHECK_TIMEOUT_S:g} s"
        routes: dict[str, tuple[str | None, list[str], dict[str, tuple[Any, ...]],
                                dict[str, tuple[str, str]]]] = {}
        for model, served in (found or {}).items():
            routes[model] = (
                served.default, served.known,
                {version: self._version_spec(queue_name(model, version), spec, closure)
                 for version, (spec, closure) in served.versions.items()},
                {version: (queue_name(model, version), str(error))
                 for version, error in served.pending.items()})
        ratio = self._tracing()
        if ratio != self._ratio:
            self._front.set_tracing(ratio)
            self._ratio = ratio
        self._front.set_routes(routes, outage)
        self._front.set_plane_enabled(True)
        self.drain()

    def drain(self) -> None:
        """Hand what the front answered since the last call to ``on_answered``."""
        for event in self._front.drain_events():
            try:
                self.on_answered(Answered.of(event))
            except Exception:  # a metrics or logging bug must not stop the refreshes
                log.exception("recording a natively answered request failed")

    async def _refresh_or_refuse(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a bug: refuse rather than route on stale checks
            log.exception("updating the native inference path failed")
            self._front.set_routes({}, "the gateway cannot check its routes now; retry later")
            self._front.set_plane_enabled(True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self._refresh_or_refuse()

    def streams(self) -> set[str]:
        """The reply streams the front may have read (deleted when the gateway stops)."""
        return set(self._streams)

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        # the first routes before the app's startup ends (the front accepts only after it):
        # no request of a gateway that has just started is told it is starting
        await self._refresh_or_refuse()
        task = asyncio.create_task(self.run(), name="native-path")
        try:
            yield
        finally:
            self._front.set_plane_enabled(False)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.drain()
            await self._dataplane.forget_streams(self.streams())
