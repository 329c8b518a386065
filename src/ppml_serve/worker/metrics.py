"""Prometheus metrics of one worker process, every model and version it serves, and its
readiness (``/ready``), served on ``worker.metrics_port`` when set."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

from ppml_serve.build_info import register_process_metrics

Authorize = Callable[[str | None], tuple[int, str] | None]
"""Given a request's Authorization header: ``None`` to serve it, else (status, words)."""


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_process_metrics(self.registry, "worker")
        self.items = Counter("ppml_worker_items", "Requests answered, by outcome",
                             ["model", "version", "outcome"], registry=self.registry)
        self.batch_size = Histogram("ppml_worker_batch_size", "Requests per engine batch",
                                    ["model", "version"], registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.engine_seconds = Histogram("ppml_worker_engine_seconds",
                                        "Time of one batch in the engine", ["model", "version"],
                                        registry=self.registry,
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                 0.25, 0.5, 1, 2.5))
        self.queue_seconds = Histogram("ppml_worker_queue_seconds",
                                       "Time a request waited from enqueue to its batch",
                                       ["model", "version"], registry=self.registry,
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.reclaimed = Counter("ppml_worker_reclaimed", "Stalled requests taken over",
                                 ["model", "version"], registry=self.registry)
        self.dead_lettered = Counter("ppml_worker_dead_lettered",
                                     "Requests moved to the dead-letter stream",
                                     ["model", "version"], registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1",
              ready: Callable[[], bool] = lambda: True, tls: ssl.SSLContext | None = None,
              authorize: Authorize | None = None,
              ) -> WSGIServer:
        """Serve ``/metrics`` (and every other path, as prometheus_client does) and
        ``/ready``: 200 while ``ready()`` holds, else 503 (a Kubernetes readiness probe).
        ``tls``: HTTPS. ``authorize``: given the Authorization header, ``None`` to serve the
        metrics or the refusal's (status, words); ``/ready`` is never refused."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            plain = [("Content-Type", "text/plain; charset=utf-8")]
            if environ.get("PATH_INFO") == "/ready":
                ok = ready()
                start_response("200 OK" if ok else "503 Service Unavailable", plain)
                return [b"ready\n" if ok else b"not ready: no model serving, or the queue "
                        b"unreachable\n"]
            refused = authorize(environ.get("HTTP_AUTHORIZATION")) if authorize else None
            if refused is not None:
                status, words = refused
                reason = "401 Unauthorized" if status == 401 else "403 Forbidden"
                start_response(reason, [*plain, *([("WWW-Authenticate", "Bearer")]
                                                  if status == 401 else [])])
                return [words.encode() + b"\n"]
            return metrics(environ, start_response)  # type: ignore[no-any-return]

        server = make_server(host, port, app, _ThreadingServer, _QuietHandler)
        if tls is not None:
            # the handshake runs in each connection's thread, on its first read: a slow
            # client cannot hold up accepting others
            server.socket = tls.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, name="worker-metrics",
                         daemon=True).start()
        return server


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the process's exit


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a connection that sends nothing is closed
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not logged (they come every few seconds)."""
