"""Assemble a worker process from settings: model bytes -> engine; brokers; sealer."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from ppml_serve.crypto.sealer import make_sealer
from ppml_serve.engines import load_engine
from ppml_serve.errors import ConfigError
from ppml_serve.queue.redis_streams import Keys, RedisWorkerBroker, connect
from ppml_serve.settings import Settings
from ppml_serve.worker.service import Worker


def read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"models: cannot read model file {path} ({exc.strerror})") from None


def build_worker(settings: Settings, model: str, path: Path) -> Worker:
    sealer = make_sealer(settings)
    engine = load_engine(model, read_model(path), threads=settings.worker.engine_threads)
    url = settings.redis_url()
    consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    keys = Keys(settings.redis.prefix)
    broker = RedisWorkerBroker(connect(url, settings.ca_file), keys, model, consumer,
                               settings.gateway.reply_stream_maxlen)
    reader = RedisWorkerBroker(connect(url, settings.ca_file), keys, model, consumer)
    return Worker(model, engine, broker, reader, sealer, settings.worker)
