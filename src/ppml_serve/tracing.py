"""OpenTelemetry tracing: W3C trace context in, spans in gateway and worker, context carried
through the queue record's clear header (the ``tp`` field, never inside the sealed payload).

Off by default (``tracing.exporter: none``): then ``span`` is an empty context manager and
no trace context is read or written, so the hot path pays nothing for it.
``otlp`` exports over OTLP/HTTP (``pip install ppml-serve[otlp]``); ``file`` writes one JSON
span per line, for debugging and tests. Spans carry names, ids, sizes and timings only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ppml_serve.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.id_generator import IdGenerator
from ppml_serve.settings import TracingSettings

TRACER_NAME = "ppml_serve"
_PROPAGATOR = TraceContextTextMapPropagator()
_configured = threading.Lock()


def tracer() -> Tracer:
    return trace.get_tracer(TRACER_NAME)


_installed = False
"""Set once a provider is installed here. Asking OpenTelemetry instead costs an environment
lookup per call while tracing is off (3 % of the gateway's event loop in py-spy, C=32)."""


def tracing_on() -> bool:
    """Whether a tracer provider is installed (``configure_tracing``, or ``install``)."""
    return _installed


def install(provider: trace.TracerProvider) -> None:
    """Make ``provider`` the process's tracer provider (OpenTelemetry takes one per process)
    and turn spans on."""
    global _installed
    with _configured:
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)
        _installed = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(name: str, headers: Mapping[str, Any] | None = None, server: bool = False,
         **attributes: Any) -> contextlib.AbstractContextManager[object]:
    """A span around a block, child of the current one (or of the ``traceparent`` in
    ``headers``); nothing at all while tracing is off."""
    if not tracing_on():
        return _OFF
    return tracer().start_as_current_span(
        name, context=context_from(headers) if headers is not None else None,
        kind=trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL,
        attributes=attributes or None)


class _PresetIds:
    """OpenTelemetry's random ids, except for the next span made by ``preset``: the native
    front picks the ids of the spans it times (it must name the ``enqueue`` span to the
    worker before Python hears of the request), and Python records them with those ids."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self._random = RandomIdGenerator()
        self._next = threading.local()

    def generate_span_id(self) -> int:
        preset = getattr(self._next, "span_id", None)
        if preset is not None:
            self._next.span_id = None
            return int(preset)
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = getattr(self._next, "trace_id", None)
        if preset is not None:
            self._next.trace_id = None
            return int(preset)
        return self._random.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return True  # the front's trace ids come from the system's random generator too

    @contextlib.contextmanager
    def preset(self, trace_id: int | None, span_id: int) -> Iterator[None]:
        self._next.trace_id, self._next.span_id = trace_id, span_id
        try:
            yield
        finally:
            self._next.trace_id = self._next.span_id = None


_PRESET_IDS: _PresetIds | None = None


def _preset_ids() -> _PresetIds:
    global _PRESET_IDS
    if _PRESET_IDS is None:
        _PRESET_IDS = _PresetIds()
    return _PRESET_IDS


def native_spans_ready() -> bool:
    """Whether spans the native front timed can be recorded with its ids (the provider is
    ours, from ``configure_tracing``); if not, traced requests take the app's path."""
    provider = trace.get_tracer_provider()
    return _PRESET_IDS is not None and getattr(provider, "id_generator", None) is _PRESET_IDS


NativeSpan = tuple[str, str, str | None, int, int, int | None]
"""A span the native front timed: name, id, parent id (None: the server span), start and
end (ns since the epoch), and its ``bytes`` attribute."""


def record_native_spans(trace_id: str, caller: str | None, spans: list[NativeSpan],
                        server_attributes: Mapping[str, Any]) -> None:
    """Record the gateway's spans of a request the native front answered, with its ids and
    times: the server span (child of the caller's span, if any) first, then the others
    under their parents."""
    if not native_spans_ready() or _PRESET_IDS is None:
        return
    from opentelemetry.context import Context as EmptyContext

    parent = (context_of(f"00-{trace_id}-{caller}-01") if caller is not None
              else EmptyContext())
    made: dict[str, Span] = {}
    ended: list[tuple[Span, int]] = []
    for name, span_id, parent_id, start_ns, end_ns, size in spans:
        under = parent if parent_id is None else trace.set_span_in_context(made[parent_id])
        attributes: dict[str, Any] = dict(server_attributes) if parent_id is None else {}
        if size is not None:
            attributes["bytes"] = size
        root_trace = int(trace_id, 16) if parent_id is None and caller is None else None
        with _PRESET_IDS.preset(root_trace, int(span_id, 16)):
            made[span_id] = tracer().start_span(
                name, context=under, start_time=start_ns, attributes=attributes or None,
                kind=trace.SpanKind.SERVER if parent_id is None else trace.SpanKind.INTERNAL)
        ended.append((made[span_id], end_ns))
    for span_made, end_ns in reversed(ended):
        span_made.end(end_time=end_ns)


def configure_tracing(settings: TracingSettings, service: str) -> None:
    """Install the process's tracer provider (once) as the settings say."""
    if settings.exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = TracerProvider(resource=Resource.create({"service.name": service}),
                              sampler=ParentBasedTraceIdRatio(settings.sample_ratio),
                              id_generator=cast("IdGenerator", _preset_ids()))
    if settings.exporter == "file":
        if settings.file is None:
            raise ConfigError("tracing.file: needed with tracing.exporter 'file'")
        provider.add_span_processor(SimpleSpanProcessor(
            _file_exporter(settings.file, settings.file_max_bytes, settings.file_backups)))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("tracing.exporter 'otlp' needs the OTLP exporter: "
                              "pip install 'ppml-serve[otlp]'") from None
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    install(provider)


class _RotatingLines:
    """A text stream (what the SDK's exporter writes to) over a rotating 0600 file: one
    span per line, never split across files."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        from ppml_serve.logs import PrivateRotatingFile

        self._file = PrivateRotatingFile(path, max_bytes, backups)
        self._file.setFormatter(logging.Formatter("%(message)s"))

    def write(self, text: str) -> int:
        self._file.emit(logging.LogRecord("ppml_serve.trace", logging.INFO, "", 0,
                                          text.rstrip("\n"), None, None))
        return len(text)

    def flush(self) -> None:
        self._file.flush()


def _file_exporter(path: Path, max_bytes: int = 50 << 20, backups: int = 3) -> Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    stream = cast(IO[str], _RotatingLines(path, max_bytes, backups))
    return ConsoleSpanExporter(out=stream,
                               formatter=lambda span: span.to_json(indent=None) + "\n")


def annotate(**attributes: Any) -> None:
    """Add attributes to the current span (nothing while tracing is off)."""
    if tracing_on():
        trace.get_current_span().set_attributes(
            {key.replace("__", "."): value for key, value in attributes.items()
             if value is not None})


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span ('' when not sampled or no tracing)."""
    if not tracing_on():
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(headers: Any) -> Context:
    """The remote parent named by ``traceparent`` in ``headers`` (a mapping), if any."""
    return _PROPAGATOR.extract(headers)


def context_of(traceparent: str) -> Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


def span_between(name: str, parent: Context | None, start_ns: int, end_ns: int,
                 **attributes: Any) -> None:
    """A span for a stretch of time measured already (e.g. time spent in the queue)."""
    if parent is None:
        return
    span: Span = tracer().start_span(name, context=parent, start_time=start_ns,
                                     attributes=attributes)
    span.end(end_time=max(end_ns, start_ns))
