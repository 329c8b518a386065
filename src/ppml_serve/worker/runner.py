"""Assemble a worker process: attest, obtain keys, decrypt the model in memory, serve."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ppml_serve.backoff import Backoff
from ppml_serve.crypto.attestation.base import AttestationRefused, Provider
from ppml_serve.crypto.attestation.measurement import Measurement, measure
from ppml_serve.crypto.attestation.policy import key_fingerprint
from ppml_serve.crypto.attestation.providers import GramineProvider, TsmProvider, auto_provider
from ppml_serve.crypto.attestation.simulated import SimulatedProvider
from ppml_serve.crypto.attestation.test_pki import TestPkiProvider
from ppml_serve.crypto.e2e import WorkerKey
from ppml_serve.crypto.envelope import Keyring, PlaintextSealer, Sealer
from ppml_serve.crypto.model_file import decrypt_model
from ppml_serve.engines import Engine, load_engine
from ppml_serve.engines.package import ModelPackage
from ppml_serve.engines.postprocess import TopK
from ppml_serve.errors import ConfigError, NotReady
from ppml_serve.keybroker.client import ReleasedKeys, obtain_keys
from ppml_serve.queue.contract import queue_name
from ppml_serve.queue.redis_common import Keys, connect, ping_sync
from ppml_serve.queue.redis_lane import BlockingRedisLane
from ppml_serve.queue.redis_worker import RedisWorkerBroker
from ppml_serve.queue.spool import PayloadSpool
from ppml_serve.repository import ModelConfig, Repository, VersionSource
from ppml_serve.repository.layout import source_of
from ppml_serve.settings import Settings, WorkerSettings
from ppml_serve.worker.metrics import WorkerMetrics
from ppml_serve.worker.service import Worker
from ppml_serve.worker.warmup import run_warmup

log = logging.getLogger("ppml_serve.worker")


def measured_config(settings: Settings, config: ModelConfig | None = None) -> dict[str, Any]:
    """The configuration that is part of a worker's measurement: the worker settings after
    the model's ``config.yaml`` choices, and its post-processing."""
    worker = config.worker_settings(settings.worker) if config is not None else settings.worker
    # Operational knobs that do not change what the worker computes stay out of it.
    measured: dict[str, Any] = {
        "worker": worker.model_dump(mode="json", exclude={"heartbeat_s", "metrics_port",
                                                          "metrics_host", "metrics_tls",
                                                          "metrics_auth"}),
        "encrypt_payloads": settings.security.encrypt_payloads}
    if config is not None and config.top_k is not None:
        measured["postprocess"] = {"top_k": config.top_k, "top_k_output": config.top_k_output}
    return measured


def version_measurement(settings: Settings, model: str, source: VersionSource,
                        config: ModelConfig | None = None) -> Measurement:
    """What a worker serving ``source`` as ``model`` with these settings will report."""
    try:
        digest = source.sha256()
    except OSError as exc:
        raise ConfigError(f"models: cannot read model file {source.path} ({exc.strerror})"
                          ) from None
    return measure(model, digest, measured_config(settings, config))


def worker_measurement(settings: Settings, model: str, path: Path) -> Measurement:
    """The measurement of a worker serving the model file ``path`` as ``model``."""
    return version_measurement(settings, model, source_of(path))


def version_release(settings: Settings, model: str, source: VersionSource,
                    config: ModelConfig | None = None) -> dict[str, str]:
    """The key-broker policy entry that lets a worker serving ``source`` as ``model`` with
    these settings receive that model's keys, and only those."""
    measurement = version_measurement(settings, model, source, config)
    # the measurement holds the model's digest: one read of a file of hundreds of MB
    entry = {"model": model, "measurement": measurement.value,
             "model_sha256": measurement.model}
    if source.encrypted:
        entry["model_key_sha256"] = key_fingerprint(source.header().wrapped_key)
    return entry


def release_entry(settings: Settings, model: str, path: Path) -> dict[str, str]:
    """``version_release`` for a single model file."""
    return version_release(settings, model, source_of(path))


def repository_releases(settings: Settings, repository: Repository,
                        models: list[str] | None = None) -> list[dict[str, str]]:
    """Policy entries for every version present of ``models`` (all by default)."""
    releases = []
    for name in models if models is not None else repository.names():
        try:
            entry = repository.entry(name)
        except ConfigError as exc:
            if models is not None:
                raise  # named on purpose: the owner must hear why it cannot be allowed
            log.warning("model %r is left out of the policy: %s", name, exc)
            continue
        for version in sorted(entry.versions, key=int):
            release = version_release(settings, name, entry.versions[version], entry.config)
            releases.append({**release, "version": version})
    return releases


def attestation_provider(settings: Settings) -> Provider:
    kind = settings.security.attestation
    if kind == "gramine":
        return GramineProvider()
    if kind in ("tdx", "snp"):
        return TsmProvider(kind)
    if kind == "auto":
        provider = auto_provider()
        log.info("attestation provider: %r", provider)
        return provider
    if settings.security.attestation == "dcap-test":
        log.warning("attestation uses a TEST PKI's DCAP quotes: no hardware protection "
                    "(development only)")
        return TestPkiProvider(settings.attestation_dir)
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


@dataclass
class LoadedVersion:
    """One model version ready to serve: its engine and the keys released for it."""

    name: str
    version: str
    engine: Engine
    sealer: Sealer
    worker_settings: WorkerSettings
    measurement: str
    provider: Provider | None = None
    worker_key: WorkerKey | None = None
    announce: dict[str, Any] = field(default_factory=dict)
    """What the gateway learns beside the spec (for ``get_model_config``)."""


def load_version(settings: Settings, name: str, version: str, source: VersionSource,
                 config: ModelConfig | None = None, labels: tuple[str, ...] = ()
                 ) -> LoadedVersion:
    """Attest, obtain this version's keys, decrypt it in memory and load it in its engine."""
    config = config or ModelConfig()
    released: ReleasedKeys | None = None
    provider: Provider | None = None
    header = source.header() if source.encrypted else None
    plain = None if source.encrypted else source.plain_package()
    digest = header.sha256 if header is not None else (plain.sha256 if plain else "")
    measurement = measure(name, digest, measured_config(settings, config))
    if source.encrypted or settings.security.encrypt_payloads:
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
                                    measurement.value, name, model_key), "the key broker")
        except AttestationRefused as exc:
            log.error("no keys for model %r version %s: %s", name, version, exc)
            raise AttestationRefused(
                f"{exc}. The owner allows this version with 'ppml-serve model add' (it "
                "writes its measurement into the key broker's policy, which is re-read "
                "without a restart)") from None
        log.info("keys released for model %r version %s (measurement %s…)", name, version,
                 measurement.value[:16])
    if plain is None:
        if released is None or released.model_key is None:
            raise AttestationRefused("the key broker released no key for the encrypted model")
        plain = ModelPackage.from_bytes(bytes(decrypt_model(source.path, released.model_key)),
                                        name)
    worker_settings = config.worker_settings(settings.worker)
    if plain.format == "openvino" and config.engine is None:
        # An IR runs on OpenVINO unless config.yaml says otherwise (and fails clearly then).
        worker_settings = worker_settings.model_copy(update={"engine": "openvino"})
    engine: Engine = load_engine(name, plain, worker_settings.engine,
                                 threads=worker_settings.engine_threads,
                                 precision=worker_settings.precision,
                                 device=worker_settings.device,
                                 execution_provider=worker_settings.execution_provider,
                                 streams=worker_settings.streams,
                                 spin_wait=worker_settings.engine_spin_wait)
    del plain
    if config.top_k is not None:
        engine = TopK(engine, config.top_k, config.top_k_output)
    warmed_s = None
    if config.warmup is not None:  # before anything is published: READY means warm
        warmed_s = run_warmup(engine, config.warmup, f"model {name!r} version {version}")
    sealer: Sealer = PlaintextSealer()
    if settings.security.encrypt_payloads and released is not None:
        sealer = Keyring(released.record_keys, released.active_record_key)
    worker_key = WorkerKey(released.inference_key) if released is not None else None
    announce = {"version": version, "max_batch_size": worker_settings.max_batch_size,
                "max_batch_delay_ms": worker_settings.max_batch_delay_ms,
                "instances": config.instances,
                "version_policy": config.version_policy.describe(),
                "labels": list(labels)}
    if config.warmup is not None and warmed_s is not None:
        announce["warmup"] = {**config.warmup.model_dump(include={"batch_size", "runs", "data"}),
                              "seconds": round(warmed_s, 4)}
    return LoadedVersion(name, version, engine, sealer, worker_settings, measurement.value,
                         provider, worker_key, announce)


def worker_for(settings: Settings, loaded: LoadedVersion,
               metrics: WorkerMetrics | None = None) -> Worker:
    """A batch loop for a loaded version, with its own queue connections."""
    url = settings.redis_url()
    consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    keys = Keys(settings.redis.prefix)
    cluster = settings.redis.cluster
    queue = queue_name(loaded.name, loaded.version)
    spool = PayloadSpool.configured(settings.redis.payload_spool)

    def lane() -> BlockingRedisLane | None:
        # a Cluster routes each key to its node: only redis-py's client knows how
        return None if cluster else BlockingRedisLane(url, settings.ca_file)

    broker = RedisWorkerBroker(connect(url, settings.ca_file, cluster), keys, queue, consumer,
                               settings.gateway.reply_stream_maxlen, spool, lane())
    reader = RedisWorkerBroker(connect(url, settings.ca_file, cluster), keys, queue, consumer,
                               spool=spool, lane=lane())
    return Worker(queue, loaded.engine, broker, reader, loaded.sealer, loaded.worker_settings,
                  worker_key=loaded.worker_key, provider=loaded.provider,
                  measurement=loaded.measurement, metrics=metrics, announce=loaded.announce)


def build_worker(settings: Settings, model: str, path: Path) -> Worker:
    """A worker for one model file, served as version 1."""
    return worker_for(settings, load_version(settings, model, "1", source_of(path)))
