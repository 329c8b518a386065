"""Assemble a worker process: attest, obtain keys, decrypt the model in memory, serve."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ppml_serve.backoff import Backoff
from ppml_serve.crypto.attestation.base import AttestationRefused, Provider
from ppml_serve.crypto.attestation.measurement import Measurement, measure
from ppml_serve.crypto.attestation.policy import key_fingerprint
from ppml_serve.crypto.attestation.simulated import SimulatedProvider
from ppml_serve.crypto.e2e import WorkerKey
from ppml_serve.crypto.envelope import Keyring, PlaintextSealer, Sealer
from ppml_serve.crypto.model_file import (
    ModelHeader,
    decrypt_model,
    is_encrypted,
    model_digest,
    read_header,
)
from ppml_serve.engines import load_engine
from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.keybroker.client import ReleasedKeys, obtain_keys
from ppml_serve.queue.redis_streams import Keys, RedisWorkerBroker, connect, ping_sync
from ppml_serve.settings import Settings
from ppml_serve.worker.service import Worker

log = logging.getLogger("ppml_serve.worker")


def measured_config(settings: Settings) -> dict[str, Any]:
    """The configuration that is part of a worker's measurement."""
    # Operational knobs that do not change what the worker computes stay out of it.
    return {"worker": settings.worker.model_dump(mode="json",
                                                 exclude={"heartbeat_s", "metrics_port",
                                                          "metrics_host"}),
            "encrypt_payloads": settings.security.encrypt_payloads}


def worker_measurement(settings: Settings, model: str, path: Path) -> Measurement:
    """What a worker serving ``path`` as ``model`` with these settings will report."""
    if not path.is_file():
        raise ConfigError(f"models: no such model file: {path}")
    try:
        digest = model_digest(path)
    except OSError as exc:
        raise ConfigError(f"models: cannot read model file {path} ({exc.strerror})") from None
    return measure(model, digest, measured_config(settings))


def release_entry(settings: Settings, model: str, path: Path) -> dict[str, str]:
    """The key-broker policy entry that lets a worker serving ``path`` as ``model`` with
    these settings receive that model's keys, and only those."""
    entry = {"model": model, "measurement": worker_measurement(settings, model, path).value,
             "model_sha256": model_digest(path)}
    if is_encrypted(path):
        with path.open("rb") as handle:
            entry["model_key_sha256"] = key_fingerprint(read_header(handle, str(path)).wrapped_key)
    return entry


def attestation_provider(settings: Settings) -> Provider:
    if settings.security.attestation == "simulated":
        log.warning("attestation is SIMULATED: no hardware protection (development only)")
        return SimulatedProvider(settings.attestation_dir)
    raise ConfigError("security.attestation: 'none' cannot obtain keys; encrypted models and "
                      "payloads need an attestation provider")


T = TypeVar("T")

UNAVAILABLE_PATIENCE_S = 60.0
"""How long a starting worker waits for the queue or the key broker before giving up."""


def _retry_not_ready(action: Callable[[], T], what: str) -> T:
    """Retry while ``what`` is unavailable (restarting, briefly down), with backoff."""
    backoff = Backoff(0.2, 5.0)
    deadline = time.monotonic() + UNAVAILABLE_PATIENCE_S
    while True:
        try:
            return action()
        except NotReady as exc:
            if time.monotonic() > deadline:
                raise
            delay = backoff.next_delay()
            log.warning("%s is not available (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)


def build_worker(settings: Settings, model: str, path: Path) -> Worker:
    if not path.is_file():
        raise ConfigError(f"models: no such model file: {path}")
    encrypted = is_encrypted(path)
    released: ReleasedKeys | None = None
    provider: Provider | None = None
    header: ModelHeader | None = None
    plaintext_model = b""  # an encrypted model is decrypted once its key is released
    if encrypted:
        with path.open("rb") as handle:
            header = read_header(handle, str(path))
        digest = header.sha256
    else:
        plaintext_model = path.read_bytes()
        digest = hashlib.sha256(plaintext_model).hexdigest()
    measurement = measure(model, digest, measured_config(settings))
    if encrypted or settings.security.encrypt_payloads:
        provider = attestation_provider(settings)
        model_key = header.wrapped_key if header is not None else None
        # Keys are asked for only from a worker that can serve: the queue must be reachable
        # and present a certificate from our CA first.
        _retry_not_ready(lambda: ping_sync(settings.redis_url(), settings.ca_file,
                                           settings.redis.cluster),
                         "the queue")
        try:
            released = _retry_not_ready(
                lambda: obtain_keys(settings.keybroker_url(), settings.ca_file, provider,
                                    measurement.value, model, model_key), "the key broker")
        except AttestationRefused as exc:
            log.error("no keys for model %r: %s", model, exc)
            raise
        log.info("keys released for model %r (measurement %s…)", model, measurement.value[:16])
    if encrypted:
        if released is None or released.model_key is None:
            raise AttestationRefused("the key broker released no key for the encrypted model")
        plaintext_model = bytes(decrypt_model(path, released.model_key))
    worker_settings = settings.worker
    engine = load_engine(model, plaintext_model, worker_settings.engine,
                         threads=worker_settings.engine_threads,
                         precision=worker_settings.precision, streams=worker_settings.streams)
    del plaintext_model
    sealer: Sealer = PlaintextSealer()
    if settings.security.encrypt_payloads and released is not None:
        sealer = Keyring(released.record_keys, released.active_record_key)
    url = settings.redis_url()
    consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    keys = Keys(settings.redis.prefix)
    cluster = settings.redis.cluster
    broker = RedisWorkerBroker(connect(url, settings.ca_file, cluster), keys, model, consumer,
                               settings.gateway.reply_stream_maxlen)
    reader = RedisWorkerBroker(connect(url, settings.ca_file, cluster), keys, model, consumer)
    worker_key = WorkerKey(released.inference_key) if released is not None else None
    return Worker(model, engine, broker, reader, sealer, settings.worker,
                  worker_key=worker_key, provider=provider, measurement=measurement.value)
