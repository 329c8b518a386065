"""Types of the native extension module (Rust, ``native/``), built by maturin."""

from typing import Any

class Keyring:
    def __init__(self, keys: dict[str, bytes], active_key_id: str) -> None: ...
    @property
    def active_key_id(self) -> str: ...
    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...
    def open(self, record: bytes, aad: bytes) -> bytes: ...
    def open_batch(
        self, records: list[bytes], aads: list[bytes], layout: BatchLayout, max_rows: int,
    ) -> OpenedBatch: ...
    def seal_v2_request(
        self, body: bytes, header_length: str | None, model: ModelInputs,
        max_rows: int | None, aad: bytes,
    ) -> Prepared: ...
    def seal_tensors(
        self, decoded: list[tuple[str, str, list[int], bytes]], model: ModelInputs,
        max_rows: int | None, aad: bytes,
    ) -> bytes: ...

class ModelInputs:
    def __init__(self, model: str, inputs: list[tuple[str, str, list[int]]]) -> None: ...

# (record, request id, parameters as JSON text, requested outputs (name, binary) or None,
# binary default, classification counts)
Prepared = tuple[bytes, str | None, str, list[tuple[str, bool]] | None, bool,
                 list[tuple[str, int]]]

def pack_tensors(
    decoded: list[tuple[str, str, list[int], bytes]], model: ModelInputs,
    max_rows: int | None,
) -> bytes: ...

def pack_v2_request(
    body: bytes, header_length: str | None, model: ModelInputs, max_rows: int | None,
) -> Prepared: ...

class BatchLayout:
    @staticmethod
    def of(inputs: list[tuple[str, str, list[int]]]) -> BatchLayout | None: ...
    def columns(self) -> list[tuple[str, str, list[int]]]: ...

# (one bytes per input, rows stacked, per record ("stacked", start, rows), ("refused",
# error) or ("unfit", plaintext))
OpenedBatch = tuple[list[bytes], int, list[tuple[Any, ...]]]

def stack_batch(plaintexts: list[bytes], layout: BatchLayout, max_rows: int) -> OpenedBatch: ...

def parse_record(
    data: bytes,
) -> tuple[str, list[tuple[str, str, list[int], int, int]]]: ...

class Front:
    def __init__(
        self, *, host: str, port: int, upstream: str, cert_file: str | None = None,
        key_file: str | None = None, client_ca_file: str | None = None,
        reuse_port: bool = False, max_header_bytes: int = 16384,
        header_timeout_s: float = 10.0, keep_alive_s: float = 5.0,
        body_timeout_s: float = 60.0, max_request_bytes: int = 67108864,
        max_connections: int = 1024, upstream_timeout_s: float = 60.0,
        max_inflight: int = 512, threads: int = 1, grpc_port: int | None = None,
        grpc_upstream: str | None = None,
    ) -> None: ...
    @property
    def port(self) -> int: ...
    @property
    def grpc_port(self) -> int | None: ...
    def start(self) -> None: ...
    def stop(self, grace_s: float) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def install_plane(
        self, *, cluster: bool, unix_path: str | None, host: str, port: int, tls: bool,
        ca_file: str | None,
        username: str | None, password: str | None, db: int, command_timeout_s: float,
        request_timeout_s: float, max_inflight_per_model: int, max_rows: int | None,
        spool: str | None, spool_min_bytes: int, announced_key: str, requested_key: str,
        job_timeout_s: float = 300.0, job_ttl_s: int = 3600,
        max_request_bytes: int = 67108864,
    ) -> None: ...
    def set_plane_enabled(self, enabled: bool) -> None: ...
    def set_tracing(self, ratio: float | None) -> None: ...
    def set_routes(
        self,
        routes: dict[str, tuple[str | None, list[str], dict[str, tuple[Any, ...]],
                                dict[str, tuple[str, str]]]],
        outage: str | None,
    ) -> None: ...
    def take_stale(self) -> bool: ...
    def set_callers(
        self, callers: list[tuple[bytes, str, list[str] | None, str, bool]],
    ) -> None: ...
    def fail_waiting(self, queue: str, message: str) -> int: ...
    def waiting_queues(self) -> list[str]: ...
    def plane_inflight(self) -> dict[str, int]: ...
    def drain_events(self) -> list[Any]: ...


def parse_v2_request(
    body: bytes, header_length: str | None = None,
) -> tuple[str | None, str,
           list[tuple[str, str, list[int], int, bytes | None, int]],
           list[tuple[str, bool]] | None, bool, list[tuple[str, int]]]: ...

def encode_v2_response(
    answer: bytes, model: str, version: str | None, request_id: str | None,
    outputs: list[tuple[str, bool]] | None, binary_default: bool,
) -> tuple[bytes, int | None]: ...
