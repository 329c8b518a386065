"""JSON logs with request ids, an access line per API call, audit lines for key releases,
and no payload byte anywhere in them (real gateway, key broker and worker processes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from ppml_serve.client import Client
from ppml_serve.local_stack import LocalStack
from ppml_serve.state import read_api_key

from .conftest import running_stack, stack_settings


@pytest.fixture(scope="module")
def json_logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(tmp_path_factory.mktemp("logs"), log={"format": "json"})
    with running_stack(settings, log_level="INFO") as local:
        yield local


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _logged(local: LocalStack) -> str:
    """Every part's log file (each part of the stack writes its own)."""
    return "".join(path.read_text() for path in sorted(local.log_dir.glob("*.log*")))


def test_access_lines_carry_request_ids_and_no_payload(json_logged: LocalStack) -> None:
    marker = b"LOG-MARKER-91c2e7"
    image = np.frombuffer((marker * 4)[:64], dtype=np.uint8).reshape(1, 8, 8)
    key = read_api_key(json_logged.settings.state_dir)
    with Client(json_logged.url, api_key=key, ca_file=json_logged.settings.ca_file) as client:
        client.infer("demo", image)
    response = httpx.post(f"{json_logged.url}/v2/models/demo/infer", content=b"{not json",
                          headers={"Authorization": f"Bearer {key}"},
                          verify=str(json_logged.settings.ca_file))
    time.sleep(0.2)  # the access line is written after the answer
    logged = _logged(json_logged)
    assert marker.decode() not in logged and marker.hex() not in logged
    records = _json_lines(logged)
    access = [r for r in records if r["logger"] == "ppml_serve.access"]
    assert len(access) >= 2, logged[-2000:]
    ok = next(r for r in access
              if r["status"] == 200 and str(r["message"]).startswith("POST"))
    assert ok["key"] == "default" and ok["model"] == "demo" and ok["bytes_in"] > 0
    assert ok["version"] == "1"
    assert str(ok["client"]).startswith("127.0.0.1:")  # through the native front
    # found: JSON lines did not say which part wrote them
    assert ok["part"] == "gateway" and isinstance(ok["pid"], int)
    assert {"gateway", "worker", "keybroker"} <= {str(r.get("part")) for r in records}, \
        {str(r.get("part")) for r in records}
    assert len(str(ok["request_id"])) == 32
    bad = next(r for r in access if r["status"] == 400)
    assert bad["request_id"] == response.headers["x-request-id"]


def test_key_releases_are_audited(json_logged: LocalStack) -> None:
    worker = next(c for c in json_logged.children if c.name.startswith("worker"))
    broker_log = json_logged.log_dir / "key-broker.log"
    before = broker_log.stat().st_size
    replacement = json_logged.child(worker.name + " (audit)", worker.argv)
    replacement.start(json_logged._env)
    try:
        started = time.monotonic()
        audit: list[dict[str, object]] = []
        while time.monotonic() - started < 60 and not audit:
            time.sleep(0.5)
            with broker_log.open() as handle:
                handle.seek(before)
                audit = [r for r in _json_lines(handle.read())
                         if r["logger"] == "ppml_serve.audit"]
    finally:
        replacement.terminate()
        replacement.wait(10)
    assert audit, "no audit line for the key release"
    assert str(audit[0]["message"]).startswith("key release released: model='demo'")


def test_grpc_access_lines_name_the_answering_version_and_sizes(
        json_logged: LocalStack) -> None:
    # found: gRPC access lines lacked the version and the sizes
    import tritonclient.grpc as triton

    key = read_api_key(json_logged.settings.state_dir)
    client = triton.InferenceServerClient(json_logged.grpc_address, ssl=True,
                                          root_certificates=str(json_logged.settings.ca_file))
    try:
        tensor = triton.InferInput("image", [1, 8, 8], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 8, 8), np.uint8))
        client.infer("demo", [tensor], headers={"authorization": f"Bearer {key}"})
    finally:
        client.close()
    time.sleep(0.2)
    lines = [r for r in _json_lines(_logged(json_logged))
             if r["logger"] == "ppml_serve.access" and str(r["message"]).startswith(
                 "gRPC ModelInfer")]
    assert lines, "no gRPC access line"
    line = lines[-1]
    assert line["version"] == "1" and line["status"] == "OK", line
    assert int(str(line["bytes_in"])) >= 64 and int(str(line["bytes_out"])) >= 40, line
