"""Typed settings: defaults < YAML file (``--config``) < ``PPML_*`` environment < CLI flags.

Nested sections use ``__`` in environment names, e.g. ``PPML_WORKER__MAX_BATCH_SIZE=8``.
Secrets are ``SecretStr`` so that they never show up in reprs or logs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Section(BaseModel):
    # the docstrings under fields become their descriptions (the configuration reference)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RedisSettings(_Section):
    url: SecretStr | None = None
    """``rediss://USER:PASSWORD@HOST:PORT/DB``. Prefer ``url_file`` so that the password
    stays out of process listings and shell history."""
    url_file: Path | None = None
    """File holding the Redis URL (mode 0600). Default: ``STATE_DIR/redis.url``."""
    ca_file: Path | None = None
    """CA bundle that signed the Redis server certificate. Default: ``STATE_DIR/ca.pem``."""
    allow_plaintext: bool = False
    """Allow ``redis://`` (no TLS). Only for benchmarking the cost of TLS."""
    prefix: str = "ppml"
    """Prefix of every key ppml-serve creates; the ACL user needs ``~PREFIX:*``."""
    local_socket: bool = True
    """``up``: gateway and workers reach the managed Redis on this host over a Unix socket in
    the 0700 state directory, as private as TLS on loopback and far cheaper (records are
    sealed either way). Off: TLS on loopback too. Hops that cross a network always use TLS."""
    cluster: bool = False
    """The URL names one node of a Redis Cluster (the client finds the others). Each model's
    keys share one hash slot, so a model lives on one shard and models spread over shards."""
    payload_spool: Path | None = None
    """A directory that every gateway and worker of one host shares (0700): request payloads
    of ``payload_spool_min_bytes`` or more are written there (sealed, as they would be in
    Redis) and the stream entry carries only the file's name, so Redis neither copies nor
    logs them. Only for parts on one host (``up`` uses ``STATE_DIR/spool``); unset, payloads
    go through Redis. Jobs always do."""
    payload_spool_min_bytes: int = Field(32 * 1024, ge=1)
    """Smaller payloads stay in the stream entry. Measured here (enqueue, read and delete,
    client and Redis CPU, AOF on): equal at 32 KiB; at 8 KiB the file costs 60 % more, at
    602 KB a third of the Redis path."""
    command_timeout_s: float = Field(1.0, gt=0, le=60)
    """How long the gateway waits for Redis to answer a command on the request path (beyond a
    blocking read's own wait) before it takes Redis for stalled: new requests then get a fast
    503 + Retry-After, while those already queued keep waiting for their answers."""
    managed_port: int | None = Field(None, ge=1, le=65535)
    """``up``: the TCP (TLS) port of the managed Redis, for firewalls and workers on other
    hosts. Unset: a free port is picked at each start."""
    max_memory_mb: int | None = Field(None, ge=16)
    """``maxmemory`` of the managed Redis. Unset: a quarter of this machine's memory. At the
    limit new requests get 503 + Retry-After while answers and heartbeats still get through
    (they are bounded by the requests already in flight), so no waiting caller hangs."""
    aof_rewrite_min_mb: int = Field(16, ge=1)
    """The managed Redis rewrites (compacts) its AOF once it has grown this much and doubled
    since the last rewrite. The state volume needs room for about three times the larger of
    this and the queue's peak size (old file, new file, writes meanwhile)."""
    min_free_disk_mb: int = Field(100, ge=0)
    """Free space the state directory's volume must keep: below it the gateway is not
    ready and refuses new requests (503) before Redis's AOF or the spool run out of disk;
    it serves again by itself once space is back. 0: not watched."""
    persistence: Literal["aof", "none"] = "aof"
    """Persistence of the managed Redis. ``aof`` (append-only file, fsync every second):
    queued requests and job answers survive a Redis restart; a crash of the machine can lose
    the last second of writes. ``none``: a Redis restart loses every queued request and job."""


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    """Interface the HTTPS gateway binds to."""
    port: int = Field(8443, ge=0, le=65535)
    """TCP port of the HTTPS gateway (0 picks a free one)."""
    grpc_port: int | None = Field(None, ge=1, le=65535)
    """Serve the KServe v2 gRPC API on this port too (TLS and mutual TLS as for HTTPS, same
    API keys in the ``authorization`` metadata). Off when unset; ``up`` picks a free port."""
    cert_file: Path | None = None
    """Server certificate (PEM). Default: the dev certificate in the state directory."""
    key_file: Path | None = None
    """Server private key (PEM). Default: the dev key in the state directory."""
    client_ca_file: Path | None = None
    """Require mutual TLS: clients must present a certificate signed by this CA (in addition
    to an API key)."""
    api_keys_file: Path | None = None
    """JSON file of hashed API keys. Default: ``STATE_DIR/api-keys.json``."""
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest accepted request body; larger ones get 413."""
    request_timeout_s: float = Field(30.0, gt=0)
    """How long a request waits for its answer before 504."""
    max_queue_length: int = Field(10_000, ge=1)
    """Backlog of a model's request stream above which new requests get 429."""
    reply_stream_maxlen: int = Field(10_000, ge=100)
    """Approximate length a gateway's reply stream is trimmed to."""
    job_timeout_s: float = Field(300.0, gt=0)
    """How long a job (``POST …/jobs``) may wait for its answer."""
    job_ttl_s: int = Field(3600, ge=1)
    """How long a job's sealed answer is kept in Redis for fetching."""
    plaintext_http: bool = False
    """Serve plain HTTP instead of HTTPS. Only for benchmarking the cost of TLS."""
    max_inflight: int = Field(512, ge=1)
    """Requests this gateway holds at once (waiting for answers); more get 429 at once."""
    max_inflight_per_model: int = Field(256, ge=1)
    """Requests this gateway holds at once for one model; more get 429 at once."""
    repository_timeout_s: float = Field(120.0, gt=0, le=3600)
    """Longest a repository load or unload call waits for the workers (attestation, key
    release, engine compilation; or draining the queue) before answering 504."""
    redis_connections: int = Field(64, ge=2, le=10_000)
    """Pooled connections from this gateway to Redis; a caller waits up to ``redis_wait_s``
    for one. Queueing requests and reading answers use lean pipelined connections of their
    own (one, plus one per model), except on a Redis Cluster, where they use this pool."""
    redis_wait_s: float = Field(2.0, gt=0, le=60)
    """Longest wait for a free Redis connection before the request gets 503."""
    max_connections: int = Field(1024, ge=1)
    """Concurrent client connections; beyond it new connections get 503 at once."""
    processes: int = Field(1, ge=1, le=64)
    """Gateway processes sharing the HTTPS and gRPC ports (SO_REUSEPORT: the kernel spreads
    new connections over them). Each is one Python thread, so where cores are free for them,
    more processes serve more requests; limits such as ``max_connections`` are per process.
    ``up`` starts this many; started by hand, each needs the same setting."""
    front_threads: int = Field(1, ge=1, le=64)
    """Threads of the native front (TLS, HTTP, limits) in each gateway process. One keeps a
    request's hand-offs between its tasks on one thread: with two, the 602 KB null-model
    benchmark cost 12-20 % more gateway CPU (more cores: more gateway processes instead)."""
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    """Largest request head (request line and headers); larger ones get 431."""
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    """A connection must send a complete request head this soon after it opens (or after
    its previous request starts); slower ones get 408 and are closed."""
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    """A request body must arrive in full this soon after its head; slower ones get 408."""
    keep_alive_s: int = Field(5, ge=1, le=600)
    """An idle keep-alive connection is closed after this long."""
    shutdown_grace_s: int = Field(10, ge=0, le=600)
    """On SIGTERM: how long requests in flight may take to be answered before they are cut."""

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        """``front: python`` and ``native_infer: false`` chose the Python request path,
        which is gone: the values every gateway now has are still taken (so that older
        configurations load), any other names the fix."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, kept, shown in (("front", {"native"}, "native"),
                                  ("native_infer", {"true", "1", "yes", "on"}, "true")):
            if name in data and str(data.pop(name)).strip().lower() not in kept:
                raise ValueError(
                    f"{name} can only be {shown} now: inference is answered by the "
                    "native front alone (the Python request path was removed); delete the "
                    "setting")
        return data


class WorkerSettings(_Section):
    max_batch_size: int = Field(16, ge=1, le=4096)
    """Most requests run in one engine call."""
    max_rows_per_request: int = Field(4096, ge=1, le=10_000_000)
    """Rows (first dimension) one request may carry; the gateway answers more with 413 before
    queueing, and a worker refuses them per item (bounds a worker's memory per request)."""
    max_batch_delay_ms: float = Field(2.0, ge=0, le=10_000)
    """Longest wait for a batch to fill once its first request has arrived."""
    engine: Literal["onnxruntime", "openvino", "auto"] = "onnxruntime"
    """Inference engine; ``auto`` picks OpenVINO on Intel CPUs when it is installed."""
    precision: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    """Compute precision of float models. ``fp32`` really means f32 (OpenVINO would otherwise
    use bf16 on capable CPUs); ``bf16`` needs OpenVINO; ``fp16`` and ``int8`` are TensorRT's
    (on a GPU). On the CPU, INT8 comes from the model file (``model quantize``)."""
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d{1,2})?)$")
    """Where ONNX Runtime runs the model: ``cpu``, or ``cuda`` / ``cuda:N`` (an NVIDIA GPU;
    ONNX Runtime's GPU build, the ``gpu`` extra). A GPU asked for and not usable fails the
    load with the reason; it never falls back to the CPU silently."""
    execution_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    """ONNX Runtime's provider on a GPU: ``auto`` takes TensorRT when installed, else CUDA
    (logged). TensorRT engines are built when a version loads, never cached on disk (a cached
    engine holds the weights in the clear)."""
    engine_threads: int = Field(0, ge=0, le=256)
    """Threads per engine call; 0 lets the engine use every core."""
    streams: int = Field(1, ge=1, le=64)
    """OpenVINO streams, and batches the worker keeps in flight at once."""
    engine_spin_wait: bool = False
    """Let ONNX Runtime's idle pool threads spin for work instead of sleeping. It saves a
    little latency only where the engine has cores to itself; with the gateway and Redis on
    the same cores it burned 1.7 ms of CPU per request (null-model benchmark, 2 cores)."""
    claim_idle_ms: int = Field(10_000, ge=100)
    """A request pending this long on a live but stuck worker is reclaimed by another (a dead
    worker's requests are taken over as soon as its heartbeat expires). Must be well under
    ``gateway.request_timeout_s``."""
    max_deliveries: int = Field(3, ge=1, le=100)
    """A request delivered more often than this goes to the dead-letter stream."""
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    """How often a worker announces itself (and looks for stalled requests). A worker silent
    for three heartbeats is dead: no new requests are admitted for it and its pending ones are
    taken over."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve this worker's Prometheus metrics on ``metrics_host``:PORT (off when unset). They
    hold no payload; give the address to your Prometheus only."""
    metrics_host: str = "127.0.0.1"
    """Interface of the worker's metrics endpoint (e.g. 0.0.0.0 in a container)."""
    metrics_tls: bool = False
    """Serve the metrics port over HTTPS, with this host's server certificate
    (``gateway.cert_file``/``key_file``; by default the state directory's)."""
    metrics_auth: bool = False
    """Require an API key with the ``metrics`` scope on the metrics port, as the gateway's
    ``/metrics`` does (its ``api-keys.json``, re-read when it changes); ``/ready`` stays open
    for probes. Use it with ``metrics_tls``: a key sent in clear could be read."""

    @property
    def dead_after_s(self) -> float:
        """Heartbeat age after which a worker counts as dead."""
        return max(3 * self.heartbeat_s, 1.0)


class KeyBrokerSettings(_Section):
    host: str = "127.0.0.1"
    """Interface the key broker binds to."""
    port: int = Field(8444, ge=0, le=65535)
    """HTTPS port of the key broker."""
    jwks_file: Path | None = None
    """Signing keys (JWKS) of the attestation service whose tokens the ``jwt`` verifier accepts."""
    inference_keys_file: Path | None = None
    """Where the broker keeps each model's end-to-end key (KMS-wrapped), written when a model
    is first released; it must be writable and persist. Default: ``KMS_DIR/inference-keys.json``."""
    jwt_issuer: str | None = None
    """Expected ``iss`` of attestation tokens (e.g. https://NAME.REGION.attest.azure.net)."""
    dcap_test_root_file: Path | None = None
    """DEVELOPMENT ONLY: a TEST root certificate (DER) that replaces Intel's pinned SGX Root CA
    for DCAP quotes (``up`` sets it for its test PKI). Claims verified against it say
    ``hardware_protected: false``; a policy accepts them only with ``allow_test_root``."""
    policy_signers: dict[str, str] = Field(default_factory=dict)
    """Operators whose Ed25519 signatures a policy needs (name -> base64 public key, from
    ``ppml-serve policy keygen``). Empty: the policy file is taken unsigned."""
    policy_threshold: int = Field(1, ge=1)
    """How many of ``policy_signers`` must have signed a policy (k of n)."""
    collateral_dir: Path | None = None
    """Cache of Intel DCAP collateral (``attest collateral fetch``), used offline.
    Default: ``STATE_DIR/attestation/collateral``."""


class SecuritySettings(_Section):
    encrypt_payloads: bool = True
    """Seal every record that enters Redis with AES-256-GCM. Off only for benchmarks."""
    kms: Literal["local", "aws", "kmip"] = "local"
    """Where primary keys live: the local passphrase-protected file, AWS KMS, or a KMIP
    server (mutual TLS)."""
    kms_dir: Path | None = None
    """Local KMS key file and the wrapped record data keys. Default: ``STATE_DIR/kms``."""
    kms_passphrase_file: Path | None = None
    """File with the local KMS passphrase (or set ``PPML_KMS_PASSPHRASE``).
    Default: ``STATE_DIR/kms-passphrase``, created by ``init``/``up`` for development."""
    aws_kms_key_id: str | None = None
    """AWS KMS key id or ARN of the primary key (``kms: aws``)."""
    aws_region: str = "us-east-1"
    """AWS region of the KMS (``kms: aws``)."""
    aws_endpoint_url: str | None = None
    """Override the AWS KMS endpoint (a VPC endpoint, or a local emulator in tests)."""
    kmip_host: str = "127.0.0.1"
    """KMIP server host (``kms: kmip``)."""
    kmip_port: int = Field(5696, ge=1, le=65535)
    """KMIP server port (``kms: kmip``)."""
    kmip_cert_file: Path | None = None
    """Client certificate for the KMIP server's mutual TLS (needs extendedKeyUsage clientAuth)."""
    kmip_key_file: Path | None = None
    """Private key of the KMIP client certificate."""
    kmip_ca_file: Path | None = None
    """CA that signed the KMIP server certificate. Default: the Redis/dev CA."""
    keybroker_url: str | None = None
    """HTTPS URL of the key broker that releases keys to attested workers.
    Default: ``STATE_DIR/keybroker.url``, written by ``up``."""
    policy_file: Path | None = None
    """Key-release policy (YAML) of the key broker. Default: ``STATE_DIR/policy.yaml``;
    without one, the strict production policy applies (simulated attestation refused)."""
    attestation: Literal["dcap-test", "simulated", "gramine", "tdx", "snp", "auto",
                         "none"] = "dcap-test"
    """Attestation provider of the worker. Hardware: ``gramine`` (SGX DCAP quotes through
    /dev/attestation), ``tdx`` and ``snp`` (through Linux configfs-tsm), ``auto`` (whichever
    this machine has). Development: ``dcap-test`` makes DCAP quotes from the state
    directory's TEST PKI, checked by the real quote verifier; ``simulated`` signs claims
    with a local platform key. Both give NO hardware protection."""


class TracingSettings(_Section):
    exporter: Literal["none", "otlp", "file"] = "none"
    """Where spans go: nowhere (off), an OTLP/HTTP collector, or a file of JSON lines."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces (default: the
    exporter's, or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)."""
    file: Path | None = None
    """File the ``file`` exporter appends spans to (one JSON object per line, 0600)."""
    file_max_bytes: int = Field(50 << 20, ge=1 << 16)
    """The span file is rotated at this size (``FILE.1`` … ``FILE.N``)."""
    file_backups: int = Field(3, ge=1, le=100)
    """Rotated span files kept."""
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of new traces recorded; a caller's sampled ``traceparent`` is always followed."""


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` (one object per line) for log collectors."""
    access_log: bool = True
    """One ``ppml_serve.access`` line per API call: key name, model, status, latency, sizes
    (never a payload)."""
    file: Path | None = None
    """Write this process's log to this file (rotated, 0600) instead of stderr. ``up`` gives
    each part its own, ``STATE_DIR/logs/PART.log``, and copies their lines to its stderr
    without ever waiting for a reader."""
    file_max_bytes: int = Field(10 << 20, ge=4096)
    """Size at which a log file is rotated."""
    audit_dir: Path | None = None
    """Where each part keeps its tamper-evident audit log (``PART.jsonl``, hash-chained;
    ``ppml-serve audit verify``). Default: ``STATE_DIR/audit``."""
    file_backups: int = Field(3, ge=0, le=100)
    """Rotated files kept (``PART.log.1`` …); the state directory holds at most
    ``(file_backups + 1) * file_max_bytes`` of logs per part."""


class Settings(BaseSettings):
    """All settings of a ppml-serve process."""

    model_config = SettingsConfigDict(
        env_prefix="PPML_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        use_attribute_docstrings=True,
    )

    state_dir: Path = Path(".ppml-serve")
    """Holds the dev CA and certificates, API keys, KMS material and the managed Redis."""
    models: dict[str, Path] = Field(default_factory=dict)
    """Models to serve: NAME -> path of a model file (served as version 1)."""
    model_repository: Path | None = None
    """A model repository (``DIR/<model>/config.yaml``, ``DIR/<model>/<version>/``) whose
    models workers serve; models can be loaded and unloaded there without restarts."""
    redis: RedisSettings = Field(default_factory=RedisSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    keybroker: KeyBrokerSettings = Field(default_factory=KeyBrokerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not MODEL_NAME.match(name):
                raise ValueError(
                    f"model name {name!r} must be 1-64 letters, digits, '_', '.' or '-'"
                )
        return value

    @model_validator(mode="after")
    def _reclaim_beats_deadline(self) -> Settings:
        # A request held by a dead or stuck worker must be taken over while its caller waits.
        worker, deadline = self.worker, self.gateway.request_timeout_s
        if worker.claim_idle_ms / 1000 + worker.heartbeat_s >= deadline:
            raise ValueError(
                f"worker.claim_idle_ms ({worker.claim_idle_ms}) plus a heartbeat must be less "
                f"than gateway.request_timeout_s ({deadline:g} s), or a stuck worker's "
                "requests are reclaimed only after their callers gave up")
        if worker.dead_after_s + worker.heartbeat_s >= deadline:
            raise ValueError(
                f"three worker heartbeats (worker.heartbeat_s = {worker.heartbeat_s:g}) must be "
                f"well under gateway.request_timeout_s ({deadline:g} s)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    # Paths derived from the state directory when not set explicitly.
    @property
    def ca_file(self) -> Path:
        return self.redis.ca_file or self.state_dir / "ca.pem"

    @property
    def redis_url_file(self) -> Path:
        return self.redis.url_file or self.state_dir / "redis.url"

    @property
    def kms_dir(self) -> Path:
        return self.security.kms_dir or self.state_dir / "kms"

    @property
    def kms_passphrase_file(self) -> Path:
        return self.security.kms_passphrase_file or self.state_dir / "kms-passphrase"

    @property
    def policy_file(self) -> Path:
        return self.security.policy_file or self.state_dir / "policy.yaml"

    @property
    def attestation_dir(self) -> Path:
        return self.state_dir / "attestation"

    def audit_log(self, part: str) -> Path:
        return (self.log.audit_dir or self.state_dir / "audit") / f"{part}.jsonl"

    @property
    def collateral_dir(self) -> Path:
        return self.keybroker.collateral_dir or self.attestation_dir / "collateral"

    def keybroker_url(self) -> str:
        if self.security.keybroker_url:
            return self.security.keybroker_url
        path = self.state_dir / "keybroker.url"
        try:
            return read_protected(path, secret=False).decode().strip()
        except OSError:
            raise ConfigError(f"security.keybroker_url: not set and {path} does not exist; "
                              "start 'ppml-serve keybroker' or 'ppml-serve up'") from None

    @property
    def api_keys_file(self) -> Path:
        return self.gateway.api_keys_file or self.state_dir / "api-keys.json"

    @property
    def server_cert_file(self) -> Path:
        return self.gateway.cert_file or self.state_dir / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.gateway.key_file or self.state_dir / "server-key.pem"

    def redis_url(self) -> SecretStr:
        """The Redis URL from ``redis.url`` or its file; a readable error if neither exists."""
        if self.redis.url is not None:
            url = self.redis.url
        else:
            path = self.redis_url_file
            try:
                url = SecretStr(read_protected(path).decode().strip())
            except OSError as exc:
                raise ConfigError(
                    f"redis.url_file: cannot read {path} ({exc.strerror}); set PPML_REDIS__URL "
                    "or run 'ppml-serve up' to create a managed Redis"
                ) from None
        scheme = url.get_secret_value().split(":", 1)[0]
        if scheme not in ("rediss", "redis", "unix"):
            raise ConfigError("redis.url: must start with rediss:// (unix:// for a Redis on "
                              "this host, or redis:// for benchmarks)")
        if scheme == "redis" and not self.redis.allow_plaintext:
            raise ConfigError(
                "redis.url: plaintext redis:// refused; use rediss:// "
                "(or set redis.allow_plaintext for a benchmark)"
            )
        return url


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{where}: {message}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; every validation problem becomes one ``ConfigError`` naming settings."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config: no such file: {config_file}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    try:
        return FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--config: {config_file} is not valid YAML{where}") from None
