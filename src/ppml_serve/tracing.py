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
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ppml_serve.errors import ConfigError
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


def configure_tracing(settings: TracingSettings, service: str) -> None:
    """Install the process's tracer provider (once) as the settings say."""
    if settings.exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = TracerProvider(resource=Resource.create({"service.name": service}),
                              sampler=ParentBasedTraceIdRatio(settings.sample_ratio))
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
