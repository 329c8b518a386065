"""Prometheus metrics of one worker process, every model and version it serves (served on
``worker.metrics_port`` when set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from ppml_serve.build_info import register_process_metrics


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

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
