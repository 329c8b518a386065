"""The native front's inference path (issue 20): REST and gRPC inference answered by the Rust
front itself (key check, admission, seal, queue, reply, response) — the only inference path
— with the app keeping the routes and keys up to date and counting, timing and logging what
the front answered.

A real stack: TLS Redis, workers with the demo model, the gateway with its native front.
Its refusals are written out here in the words the Python request path gave (this suite
compared the two, request for request, until that path was removed)."""

from __future__ import annotations

import gzip
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ppml_serve.bench.faults import wait_until
from ppml_serve.codecs.tensors import deserialize_bytes
from ppml_serve.engines import load_engine
from ppml_serve.gateway.auth import add_api_key, revoke_api_key
from ppml_serve.models import demo_model_path, demo_samples

from .conftest import MAX_REQUEST_BYTES, Stack, running_stack, stack_settings

IMAGES, _ = demo_samples()


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("native"),
        worker={"heartbeat_s": 0.3, "max_batch_delay_ms": 5, "engine_threads": 1,
                "max_rows_per_request": 64})
    with running_stack(settings, workers=1, log_level="INFO") as local:
        yield Stack(local)


def answered_natively(stack: Stack) -> int:
    return stack.native_answers()


def json_request(rows: int = 1, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [rows, 8, 8],
                        "data": IMAGES[:rows].ravel().tolist()}], **extra}


def post(stack: Stack, path: str, body: dict[str, object]) -> httpx.Response:
    with stack.http() as http:
        return http.post(path, json=body)


def send(stack: Stack, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    with stack.http() as http:
        return http.post(path, content=content, headers=headers)


def gateway_log(stack: Stack) -> str:
    return (stack.settings.state_dir / "logs" / "gateway.log").read_text()


def test_the_front_answers_inference_itself_and_the_app_counts_and_logs_it(
        native: Stack) -> None:
    before = answered_natively(native)
    expected = load_engine("demo", demo_model_path().read_bytes()).infer({"image": IMAGES[:3]})
    with native.http() as http:
        response = http.post("/v2/models/demo/infer", json=json_request(3, id="mine"),
                             headers={"X-Request-ID": "native-probe-1"})
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "native-probe-1"
        document = response.json()
        assert (document["model_name"], document["model_version"], document["id"]) == \
            ("demo", "1", "mine")
        output = document["outputs"][0]
        scores = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(scores, expected[output["name"]], rtol=1e-5, atol=1e-6)
        versioned = http.post("/v2/models/demo/versions/1/infer", json=json_request(1))
        assert versioned.status_code == 200
        # the same request, the same document
        again = http.post("/v2/models/demo/infer", json=json_request(3, id="mine"))
        assert again.status_code == 200 and again.json() == document
        stats = http.get("/v2/models/demo/versions/1/stats").json()["model_stats"][0]
    assert answered_natively(native) == before + 3
    assert stats["inference_stats"]["success"]["count"] >= 2  # the front's answers, counted
    assert stats["inference_stats"]["queue"]["count"] >= 2
    # without a caller's id, the header carries the one in the queue record and the logs
    logged = versioned.headers["x-request-id"]
    deadline = time.monotonic() + 3
    while logged not in gateway_log(native) and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in gateway_log(native).splitlines() if logged in line)
    assert "POST /v2/models/demo/versions/1/infer key=default model=demo version=1 " \
        "status=200" in line


@pytest.mark.parametrize("binary", [False, True])
def test_the_classification_extension_names_the_best_classes(native: Stack,
                                                              binary: bool) -> None:
    body = json_request(3, outputs=[{"name": "probabilities", "parameters": {
        "classification": 3, "binary_data": binary}}])
    before = answered_natively(native)
    with native.http() as http:
        response = http.post("/v2/models/demo/infer", json=body)
    assert response.status_code == 200, response.text
    assert answered_natively(native) == before + 1
    if binary:  # the header, then each class as a 4-byte length and "score:index"
        size = int(response.headers["inference-header-content-length"])
        classes = json.loads(response.content[:size])["outputs"][0]
        rows = [item.decode() for item in deserialize_bytes(response.content[size:], [9])]
        assert classes["parameters"]["binary_data_size"] == len(response.content) - size
    else:
        classes = response.json()["outputs"][0]
        rows = classes["data"]
    assert (classes["datatype"], classes["shape"]) == ("BYTES", [3, 3])
    scores = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": IMAGES[:3]})["probabilities"]
    assert [[int(row.split(":")[1]) for row in rows[i * 3:i * 3 + 3]] for i in range(3)] == \
        [list(np.argsort(-row)[:3]) for row in scores]


def test_the_binary_extension_takes_the_native_path(native: Stack) -> None:
    before = answered_natively(native)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8],
                                     "parameters": {"binary_data_size": 128}}],
                         "parameters": {"binary_data_output": True}}).encode()
    with native.http() as http:
        response = http.post("/v2/models/demo/infer", content=header + IMAGES[:2].tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    document = json.loads(response.content[:size])
    output = document["outputs"][0]
    assert output["parameters"]["binary_data_size"] == len(response.content) - size
    scores = np.frombuffer(response.content[size:], dtype=np.float32).reshape(output["shape"])
    expected = load_engine("demo", demo_model_path().read_bytes()).infer({"image": IMAGES[:2]})
    np.testing.assert_allclose(scores, expected[output["name"]], rtol=1e-5, atol=1e-6)
    assert answered_natively(native) == before + 1


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 7],
                  "data": [0] * 56}]}, 400,
     "input 'image': shape [1, 8, 7] does not match the model's [-1, 8, 8] (-1 = any size)"),
    ({"inputs": [{"name": "picture", "datatype": "UINT8", "shape": [1, 8, 8],
                  "data": [0] * 64}]}, 400,
     "input 'picture' is not an input of model 'demo' (expected: image)"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8],
                  "data": [0.0] * 64}]}, 400,
     "input 'image': datatype FP32 does not match the model's UINT8"),
    (json_request(1, outputs=[{"name": "nope"}]), 400,
     "output 'nope' is not an output of model 'demo' (available: probabilities)"),
    (json_request(1, outputs=[{"name": "probabilities",
                               "parameters": {"classification": 1001}}]), 400,
     "output 'probabilities': classification may ask for at most 1000 classes"),
    ({"inputs": "not a list"}, 400, "inputs must be a non-empty list"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [65, 8, 8],
                  "data": [0] * 65 * 64}]}, 413,
     "the request has 65 rows; at most 64 per request (split it, or raise "
     "worker.max_rows_per_request)"),
])
def test_refusals_on_the_native_path_keep_the_apps_words(native: Stack,
                                                         body: dict[str, object],
                                                         status: int, words: str) -> None:
    before = answered_natively(native)
    with native.http() as http:
        response = http.post("/v2/models/demo/infer", json=body)
    assert (response.status_code, response.json()) == (status, {"error": words})
    assert answered_natively(native) == before + 1


def test_unknown_and_malformed_versions_and_escaped_names_are_the_fronts(
        native: Stack) -> None:
    before = answered_natively(native)
    for path, words in (
            ("/v2/models/demo/versions/9/infer", "model 'demo' has no version '9' (versions: 1)"),
            ("/v2/models/demo/versions/0x/infer",
             "model 'demo' has no version '0x' (versions are positive integers)"),
            ("/v2/models/nope/versions/0123456789abcdef/infer",
             "model 'nope' has no version '0123456789ab' (versions are positive integers)"),
            ("/v2/models/demo/versions/%39/infer",
             "model 'demo' has no version '9' (versions: 1)")):
        mine = post(native, path, json_request())
        assert (mine.status_code, mine.json()) == (404, {"error": words}), path
    # names and versions are read percent-decoded, as the app reads them
    for path in ("/v2/models/d%65mo/infer", "/v2/models/d%65mo/versions/%31/infer"):
        assert post(native, path, json_request()).status_code == 200, path
    assert answered_natively(native) == before + 6


def test_unknown_models_are_refused_by_the_front_unless_named_since(native: Stack) -> None:
    before = answered_natively(native)
    for path, name in (("/v2/models/nope/infer", "'nope'"),
                       ("/v2/models/nope/versions/2/infer", "'nope'"),
                       ("/v2/models/it's/jobs", '"it\'s"'),
                       ("/v2/models/nope/infer-sealed", "'nope'")):
        mine = post(native, path, json_request())
        assert (mine.status_code, mine.json()) == \
            (404, {"error": f"model {name} is not served here"}), path
    unknown = grpc_request(1)
    unknown.model_name = "nope"
    _, code, words = grpc_call(native, unknown)
    assert (code, words) == ("NOT_FOUND", "model 'nope' is not served here")
    assert answered_natively(native) == before + 5
    # a name announced by a worker, or asked to be loaded, since the routes were built: the
    # front has them rebuilt from fresh reads before it judges (still 404 here: what Redis
    # holds for these names is nothing this gateway can serve)
    before = answered_natively(native)
    admin = native.admin()
    try:
        admin.hset("ppml:models", "fresh", b"not a spec sealed with our keys")
        admin.hset("ppml:repository", "asked", b"{}")
        for name in ("fresh", "asked"):
            assert post(native, f"/v2/models/{name}/infer",
                              json_request()).status_code == 404
    finally:
        admin.hdel("ppml:models", "fresh")
        admin.hdel("ppml:repository", "asked")
    assert answered_natively(native) == before + 2
    with native.http() as http:
        metrics = http.get("/metrics").text
    assert 'ppml_requests_total{model="_other",status="404",version="_other"}' in metrics


def test_callers_refused_for_their_key_are_answered_by_the_front_in_the_apps_words(
        native: Stack) -> None:
    """401 and 403 before anything else, held model or not, as the app authenticates first:
    a flood of calls without a key costs the front, not the app's Python."""
    tokens = {
        "other": add_api_key(native.settings.api_keys_file, "only-other", ["other"]),
        "metrics": add_api_key(native.settings.api_keys_file, "metrics-only", ["*"],
                               scopes=("metrics",)),
    }
    no_key = "missing or invalid API key"
    not_this_model = "this API key may not use this model"
    cases = [
        ("/v2/models/demo/infer", None, no_key), ("/v2/models/demo/infer", "ppml_wrong", no_key),
        ("/v2/models/nope/versions/3/infer", None, no_key),
        ("/v2/models/demo/jobs", "ppml_wrong", no_key),
        ("/v2/models/demo/jobs/0123456789abcdef0123456789abcdef", None, no_key),
        ("/v2/models/demo/infer-sealed", None, no_key),
        ("/v2/models/demo/infer", "other", not_this_model),
        ("/v2/models/demo/versions/1/infer", "metrics",
         "this API key may not call the inference API"),
        ("/v2/models/demo/jobs", "other", not_this_model),
    ]
    try:
        def send(path: str, key: str | None) -> httpx.Response:
            with native.http(api_key=tokens.get(key or "", key)) as http:
                method = "GET" if "/jobs/" in path else "POST"
                return http.request(method, path, json=json_request())

        # the key file reloaded (up to a second, then the front's next routes)
        deadline = time.monotonic() + 5
        while send("/v2/models/demo/infer", "other").status_code != 403:
            assert time.monotonic() < deadline, "the new keys were never loaded"
            time.sleep(0.1)
        before = answered_natively(native)
        for path, key, words in cases:
            mine = send(path, key)
            status = 401 if key in (None, "ppml_wrong") else 403
            assert (mine.status_code, mine.json()) == (status, {"error": words}), (path, key)
            assert mine.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)
            assert mine.headers.get("x-request-id")
        assert answered_natively(native) == before + len(cases)
        # counted and logged as the app counts and logs its own
        with native.http() as http:
            metrics = http.get("/metrics").text
        assert 'ppml_requests_total{model="demo",status="401",version="-"}' in metrics
        assert 'ppml_requests_total{model="_other",status="401",version="_other"}' in metrics
        deadline = time.monotonic() + 3
        while "key=metrics-only model=demo version=1 status=403" not in gateway_log(native):
            assert time.monotonic() < deadline, "the refusal was not logged"
            time.sleep(0.05)
    finally:
        revoke_api_key(native.settings.api_keys_file, "only-other")
        revoke_api_key(native.settings.api_keys_file, "metrics-only")


def test_a_new_key_is_taken_and_a_revoked_one_refused_within_the_reload_interval(
        native: Stack) -> None:
    token = add_api_key(native.settings.api_keys_file, "short-lived", ["demo"])
    deadline = time.monotonic() + 5
    with native.http(api_key=token) as http:
        while (status := http.post("/v2/models/demo/infer",
                                   json=json_request()).status_code) != 200:
            assert time.monotonic() < deadline, f"the new key still gets {status}"
            time.sleep(0.1)
        before = answered_natively(native)
        assert http.post("/v2/models/demo/infer", json=json_request()).status_code == 200
        assert answered_natively(native) == before + 1
        revoke_api_key(native.settings.api_keys_file, "short-lived")
        revoked = time.monotonic()
        while (status := http.post("/v2/models/demo/infer",
                                   json=json_request()).status_code) == 200:
            assert time.monotonic() - revoked < 2.5, "a revoked key still answered"
            time.sleep(0.05)
        assert status == 401


def test_the_plaintext_benchmark_mode_takes_the_native_path_too(tmp_path: Path) -> None:
    """``security.encrypt_payloads: false`` exists to measure what the envelope costs: the
    comparison holds only if both sides take the same path."""
    settings = stack_settings(tmp_path, security={"encrypt_payloads": False})
    with running_stack(settings, workers=1) as local:
        plain = Stack(local)
        before = answered_natively(plain)
        with plain.http() as http:
            response = http.post("/v2/models/demo/infer", json=json_request(2))
        assert response.status_code == 200, response.text
        output = response.json()["outputs"][0]
        expected = load_engine("demo", demo_model_path().read_bytes()).infer(
            {"image": IMAGES[:2]})[output["name"]]
        np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]),
                                   expected, rtol=1e-5, atol=1e-6)
        assert answered_natively(plain) == before + 1


# gRPC: ModelInfer on the gRPC port is answered by the front too, in the words the Python gRPC
# service gave.

def grpc_call(stack: Stack, request: object, compressed: str | None = None,
              key: str | None = None) -> tuple[object, str, str]:
    """(response or None, status code name, details) of one ModelInfer."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    credentials = grpc.ssl_channel_credentials(stack.ca_file.read_bytes())
    with grpc.secure_channel(stack.local.grpc_address, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(
                request, metadata=(("authorization", f"Bearer {key or stack.api_key}"),),
                compression=getattr(grpc.Compression, compressed) if compressed else None,
                timeout=10)
        except grpc.RpcError as error:
            return None, error.code().name, error.details() or ""
    return response, "OK", ""


def grpc_request(rows: int = 1, typed: bool = False, **fields: object) -> object:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="demo", **fields)
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[rows, 8, 8])
    if typed:
        tensor.contents.uint_contents.extend(IMAGES[:rows].ravel().tolist())
    else:
        request.raw_input_contents.append(IMAGES[:rows].tobytes())
    return request


def test_grpc_model_infer_is_answered_by_the_front_as_the_service_would(
        native: Stack) -> None:
    from tritonclient.grpc import service_pb2 as pb

    expected = load_engine("demo", demo_model_path().read_bytes()).infer({"image": IMAGES[:3]})
    before = answered_natively(native)
    request = grpc_request(3, id="grpc-mine")
    response, code, _ = grpc_call(native, request)
    assert code == "OK" and isinstance(response, pb.ModelInferResponse)
    assert (response.model_name, response.model_version, response.id) == \
        ("demo", "1", "grpc-mine")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == \
        [("probabilities", "FP32", [3, 10])]
    scores = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(scores, expected["probabilities"], rtol=1e-5, atol=1e-6)
    # typed contents (the same answer), compressed messages (read natively too), and the
    # classification extension (the best three classes, "score:index", as BYTES)
    classified = grpc_request(3)
    classified.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    answers = []
    for message in (request, grpc_request(3, typed=True, id="grpc-mine"), classified):
        native_answer, code, details = grpc_call(native, message)
        assert code == "OK", details
        packed = [grpc_call(native, message, compressed=how)[0] for how in ("Gzip", "Deflate")]
        assert native_answer == packed[0] == packed[1]
        answers.append(native_answer)
    assert answers[0] == answers[1]
    [classes] = answers[2].outputs
    assert (classes.datatype, list(classes.shape)) == ("BYTES", [3, 3])
    rows = [item.decode() for item in deserialize_bytes(answers[2].raw_output_contents[0], [9])]
    assert [[int(row.split(":")[1]) for row in rows[i * 3:i * 3 + 3]] for i in range(3)] == \
        [list(np.argsort(-row)[:3]) for row in expected["probabilities"]]
    assert answered_natively(native) == before + 10
    deadline = time.monotonic() + 3
    while "gRPC ModelInfer key=default model=demo version=1 status=OK" not in \
            gateway_log(native) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gRPC ModelInfer key=default model=demo version=1 status=OK" in gateway_log(native)


def test_grpc_refusals_read_as_the_services(native: Stack) -> None:
    from tritonclient.grpc import service_pb2 as pb

    def shaped(shape: list[int], datatype: str = "UINT8", name: str = "image") -> Any:
        request = pb.ModelInferRequest(model_name="demo")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = int(np.prod(shape)) * (4 if datatype == "FP32" else 1)
        request.raw_input_contents.append(bytes(size))
        return request

    unknown_output = grpc_request(1)
    unknown_output.outputs.add(name="logits")
    cases = {
        "shape": (shaped([1, 4, 16]), "INVALID_ARGUMENT",
                  "input 'image': shape [1, 4, 16] does not match the model's [-1, 8, 8] "
                  "(-1 = any size)"),
        "datatype": (shaped([1, 8, 8], "FP32"), "INVALID_ARGUMENT",
                     "input 'image': datatype FP32 does not match the model's UINT8"),
        "input name": (shaped([1, 8, 8], name="img"), "INVALID_ARGUMENT",
                       "input 'img' is not an input of model 'demo' (expected: image)"),
        "output": (unknown_output, "INVALID_ARGUMENT",
                   "output 'logits' is not an output of model 'demo' (available: "
                   "probabilities)"),
        "rows": (shaped([65, 8, 8]), "RESOURCE_EXHAUSTED",
                 "the request has 65 rows; at most 64 per request (split it, or raise "
                 "worker.max_rows_per_request)"),
    }
    before = answered_natively(native)
    for what, (request, code, words) in cases.items():
        assert grpc_call(native, request)[1:] == (code, words), what
    assert answered_natively(native) == before + len(cases)
    # a caller without a valid key is refused by the front, in the service's words
    before = answered_natively(native)
    unknown_model = grpc_request(1)
    unknown_model.model_name = "nope"
    for request in (grpc_request(1), unknown_model):
        assert grpc_call(native, request, key="wrong-key")[1:] == \
            ("UNAUTHENTICATED", "missing or invalid API key")
    assert answered_natively(native) == before + 2
    # an unknown or malformed version: the front's, in the service's words
    before = answered_natively(native)
    for version, words in (("9", "model 'demo' has no version '9' (versions: 1)"),
                           ("v1", "model 'demo' has no version 'v1' (versions are positive "
                                  "integers)")):
        asked = grpc_request(1)
        asked.model_version = version
        assert grpc_call(native, asked)[1:] == ("NOT_FOUND", words)
    assert answered_natively(native) == before + 2
    # messages the service's decoder would not read: the front's, in its words and order
    # (the tensors before the version: a bad tensor for a version that does not exist is
    # refused for the tensor)
    unsupported = ("input 'image': unsupported datatype 'FP8' (supported: BOOL, UINT8, UINT16, "
                   "UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES)")
    bad_version = shaped([1, 8, 8], "FP8")
    bad_version.model_version = "9"
    raw_size = shaped([1, 8, 8], "FP32")
    raw_size.raw_input_contents[0] = b"\0" * 5
    unread = {
        "raw count": (pb.ModelInferRequest(model_name="demo", raw_input_contents=[b"x"]),
                      "raw_input_contents must hold one entry per input"),
        "no inputs": (pb.ModelInferRequest(model_name="demo"),
                      "inputs must be a non-empty list"),
        "datatype name": (shaped([1, 8, 8], "FP8"), unsupported),
        "raw size": (raw_size,
                     "input 'image': raw contents hold 5 bytes, shape [1, 8, 8] needs 256"),
        "before the version": (bad_version, unsupported),
    }
    before = answered_natively(native)
    for what, (request, words) in unread.items():
        assert grpc_call(native, request)[1:] == ("INVALID_ARGUMENT", words), what
    assert answered_natively(native) == before + len(unread)


def test_a_job_is_submitted_on_the_native_path_and_fetched_as_ever(native: Stack) -> None:
    expected = load_engine("demo", demo_model_path().read_bytes()).infer({"image": IMAGES[:2]})
    before = answered_natively(native)
    asked = json_request(2, outputs=[{"name": "probabilities"}])
    with native.http() as http:
        submitted = http.post("/v2/models/demo/jobs", json=asked)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        assert submitted.json() == {"job_id": job_id, "model": "demo"}
        assert submitted.headers["location"] == f"/v2/models/demo/jobs/{job_id}"
        deadline = time.monotonic() + 10
        polls = 0
        while (fetched := http.get(f"/v2/models/demo/jobs/{job_id}")).status_code == 202 \
                and time.monotonic() < deadline:
            assert fetched.json() == {"job_id": job_id, "state": "pending"}
            assert fetched.headers["retry-after"] == "1"
            polls += 1
            time.sleep(0.05)
        assert fetched.status_code == 200, fetched.text
        assert (fetched.json()["id"], fetched.json()["model_version"]) == (job_id, "1")
        outputs = fetched.json()["outputs"]
        assert [o["name"] for o in outputs] == ["probabilities"]
        np.testing.assert_allclose(np.array(outputs[0]["data"], np.float32).reshape(2, 10),
                                   expected["probabilities"], rtol=1e-5, atol=1e-6)
        # another key may not fetch it (the owner is the submitting key's id)
        other = add_api_key(native.settings.api_keys_file, "job-stranger", ["demo"])
        time.sleep(1.2)  # the key file's reload interval
        theirs = http.get(f"/v2/models/demo/jobs/{job_id}",
                          headers={"Authorization": f"Bearer {other}"})
        assert theirs.status_code == 404, theirs.text
        assert theirs.json() == {"error": f"no job {job_id!r} for model 'demo' (unknown or "
                                          "expired)"}
        unknown = http.get("/v2/models/demo/jobs/0123")
        assert unknown.status_code == 404 and "'0123'" in unknown.json()["error"]
        # refusals, in the app's words
        for body, words in (
                (json_request(2, outputs=[{"name": "probabilities",
                                           "parameters": {"classification": 2}}]),
                 "the classification extension is not supported for jobs; ask for it on the "
                 "model's /infer route"),
                (json_request(1, outputs=[{"name": "logits"}]),
                 "output 'logits' is not an output of model 'demo' (available: "
                 "probabilities)")):
            refused = http.post("/v2/models/demo/jobs", json=body)
            assert (refused.status_code, refused.json()) == (400, {"error": words})
    # submitted, fetched (each poll too), the stranger's and the unknown fetch, two refusals
    assert answered_natively(native) == before + 1 + polls + 1 + 2 + 2
    assert any(f"GET /v2/models/demo/jobs/{job_id} key=default model=demo version=1 "
               "status=200" in line for line in gateway_log(native).splitlines())


def test_an_oversized_grpc_message_is_refused_in_our_words(native: Stack) -> None:
    from tritonclient.grpc import service_pb2 as pb

    limit = native.settings.gateway.max_request_bytes
    request = pb.ModelInferRequest(model_name="demo")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8])
    request.raw_input_contents.append(bytes(limit + 1))
    _, code, words = grpc_call(native, request)
    assert code == "RESOURCE_EXHAUSTED", words
    assert f"larger than {limit} bytes (gateway.max_request_bytes)" in words
    # the port serves on
    _, code, words = grpc_call(native, grpc_request(1))
    assert code == "OK", words


def test_compressed_bodies_are_read_by_the_front_and_bad_ones_refused_in_the_apps_words(
        native: Stack) -> None:
    import zlib

    body = json.dumps(json_request(2, id="packed")).encode()
    deflated = zlib.compressobj(wbits=zlib.MAX_WBITS)
    deflate = deflated.compress(body) + deflated.flush()
    before = answered_natively(native)
    with native.http() as http:
        plain = http.post("/v2/models/demo/infer", content=body,
                          headers={"Content-Type": "application/json"})
        answers = [http.post("/v2/models/demo/infer", content=packed,
                             headers={"Content-Type": "application/json",
                                      "Content-Encoding": encoding})
                   for encoding, packed in (("gzip", gzip.compress(body)),
                                            ("deflate", deflate))]
        assert plain.status_code == 200, plain.text
        for answer in answers:
            assert (answer.status_code, answer.json()) == (200, plain.json())
    assert answered_natively(native) == before + 3
    # what does not decompress, is too large once decompressed, or is in an encoding the
    # gateway does not read: the front's refusal, in the app's words
    before = answered_natively(native)
    for content, encoding, status, words in (
            (b"\x1f\x8bnot gzip", "gzip", 400, "the request body is not valid gzip data"),
            (gzip.compress(body)[:-9], "x-gzip", 400,
             "the request body ends inside its x-gzip data"),
            (deflate[:-3], "deflate", 400, "the request body ends inside its deflate data"),
            (gzip.compress(b" " * (MAX_REQUEST_BYTES + 1)), "gzip", 413,
             f"request body exceeds the {MAX_REQUEST_BYTES}-byte limit once decompressed"),
            (body, "BR", 415,
             "Content-Encoding 'br' is not supported (gzip, deflate or none)")):
        mine = send(native, "/v2/models/demo/infer", content, {"Content-Encoding": encoding})
        assert (mine.status_code, mine.json()) == (status, {"error": words}), encoding
    assert answered_natively(native) == before + 5


def _first(send: Callable[[], httpx.Response], status: int,
           timeout_s: float = 5.0) -> httpx.Response:
    """``send``'s first answer with ``status`` (the front's routes are rebuilt every 0.1 s),
    or its last one after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = send()
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_a_closed_version_is_refused_by_the_front_in_the_apps_words(tmp_path: Path) -> None:
    """No live worker (503) and a backlog over its bound (429) are answered by the front
    itself, after the input is checked as the app checks it first, in the app's words; a
    worker that comes opens the version at once, not a refresh later."""
    import signal

    settings = stack_settings(
        tmp_path, gateway={"port": 0, "max_request_bytes": MAX_REQUEST_BYTES,
                           "request_timeout_s": 20, "max_queue_length": 3},
        # beats 3 s apart: a frozen worker stays live for 9 s (the backlog case)
        worker={"heartbeat_s": 3.0, "max_batch_delay_ms": 5, "engine_threads": 1})
    bad = {"inputs": [{"name": "img", "datatype": "UINT8", "shape": [1, 8, 8],
                       "data": [0] * 64}]}
    with running_stack(settings, workers=1) as local:
        stack = Stack(local)
        admin = stack.admin()
        [worker] = stack.workers
        with stack.http() as http:
            def infer() -> httpx.Response:
                return http.post("/v2/models/demo/infer", json=json_request(1))

            assert infer().status_code == 200
            assert worker.process is not None
            worker.process.send_signal(signal.SIGSTOP)
            try:
                for _ in range(3):  # records no worker reads while it is frozen
                    admin.xadd("ppml:{demo}:req", {"id": "filler", "body": b""})
                time.sleep(0.5)  # the backlog is read every 0.1 s (the app's cache too)
                before = answered_natively(stack)
                full = _first(infer, 429)
                assert full.status_code == 429, full.text
                assert full.json() == {"error": "model 'demo' has 3 queued requests; retry "
                                                "later"}
                assert full.headers["retry-after"] == "1"
                # the input is checked first, in the app's words
                invalid = http.post("/v2/models/demo/infer", json=bad)
                assert (invalid.status_code, invalid.json()) == (400, {
                    "error": "input 'img' is not an input of model 'demo' (expected: image)"})
                _, code, words = grpc_call(stack, grpc_request(1))
                assert (code, words) == ("RESOURCE_EXHAUSTED", full.json()["error"])
                assert answered_natively(stack) >= before + 3
                assert admin.xlen("ppml:{demo}:req") == 3  # nothing was queued
            finally:
                worker.process.send_signal(signal.SIGCONT)
            assert _first(infer, 200).status_code == 200

            worker.process.send_signal(signal.SIGTERM)  # a clean stop leaves the group
            worker.process.wait(10)
            # the routes then say so within 0.1 s (a request queued just before is failed
            # by the gateway's watch of its workers, in its own words)
            time.sleep(0.5)
            before = answered_natively(stack)
            gone = _first(infer, 503)
            assert gone.status_code == 503, gone.text
            assert gone.json() == {"error": "model 'demo' version 1 has no live worker"}
            assert gone.headers["retry-after"] == "1"
            job = http.post("/v2/models/demo/jobs", json=json_request(1))
            sealed = http.post("/v2/models/demo/infer-sealed", content=b"x" * 64)
            assert (job.status_code, job.json()) == (503, gone.json())
            assert (sealed.status_code, sealed.json()) == (503, gone.json())
            _, code, words = grpc_call(stack, grpc_request(1))
            assert (code, words) == ("UNAVAILABLE", gone.json()["error"])
            assert answered_natively(stack) >= before + 4

            # a worker back: its first request is served as soon as the service is ready
            stack.replace_worker(worker)
            deadline = time.monotonic() + 30
            while http.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "the new worker never became ready"
                time.sleep(0.02)
            before = answered_natively(stack)
            assert infer().status_code == 200
            assert answered_natively(stack) == before + 1


@pytest.mark.parametrize("method,path", [
    ("GET", "/v2/models/demo/infer"), ("PUT", "/v2/models/demo/versions/1/infer"),
    ("DELETE", "/v2/models/demo/infer-sealed"), ("GET", "/v2/models/demo/jobs"),
    ("POST", "/v2/models/demo/jobs/0123456789abcdef0123456789abcdef"),
    ("HEAD", "/v2/models/demo/jobs/0123456789abcdef0123456789abcdef")])
def test_other_methods_on_inference_routes_get_the_apps_answer(
        native: Stack, method: str, path: str) -> None:
    before = answered_natively(native)
    with native.http() as http:
        mine = http.request(method, path, json=json_request(1))
    assert mine.status_code == 405
    if method != "HEAD":  # (a HEAD's answer has no body)
        assert mine.json() == {"error": "method not allowed"}
    assert answered_natively(native) == before
    assert f"the front passed {method} {path} on" not in gateway_log(native)


def test_redis_not_answering_is_refused_by_the_front_at_once(tmp_path: Path) -> None:
    """Redis frozen: the route checks get no answer within a second, and from then every
    inference call gets the front's 503 with Retry-After, after its key is checked; once
    Redis answers again the routes are back."""
    settings = stack_settings(tmp_path, gateway={"port": 0, "request_timeout_s": 5})
    with running_stack(settings, workers=1) as local:
        stack = Stack(local)
        redis_process = local.redis.process
        assert redis_process is not None

        def infer(key: str | None = "default") -> httpx.Response:
            with stack.http(key) as http:
                return http.post("/v2/models/demo/infer", json=json_request())

        assert infer().status_code == 200
        before = answered_natively(stack)
        redis_process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.6)  # a route check's deadline (1 s), and the next refresh
            started = time.monotonic()
            frozen = infer()
            took_s = time.monotonic() - started
            keyless = infer(None)
        finally:
            redis_process.send_signal(signal.SIGCONT)
        assert frozen.status_code == 503 and frozen.headers["retry-after"] == "1", frozen.text
        assert frozen.json() == {"error": "redis not reachable: no answer within 1 s"}
        assert took_s < 2.5, f"the refusal took {took_s:.1f} s"  # not the request deadline
        assert keyless.status_code == 401
        assert wait_until(lambda: infer().status_code == 200, 15)
        assert answered_natively(stack) >= before + 3


def test_no_answer_within_the_deadline_is_504_and_a_callers_id_is_not_the_queues(
        tmp_path: Path) -> None:
    """A frozen worker, kept live (its heartbeats refreshed as its own heartbeat thread keeps
    them through a long engine call), holds the request: 504 at the deadline, counted from
    the request's arrival (the record's deadline says so too). The caller's X-Request-ID is
    echoed but never becomes the record's id (a repeated one would collide with another
    caller's request)."""
    import concurrent.futures

    settings = stack_settings(tmp_path, gateway={"port": 0, "request_timeout_s": 2})
    with running_stack(settings, workers=1) as local:
        stack = Stack(local)
        [worker] = stack.workers
        assert worker.process is not None
        admin = stack.admin()
        with stack.http() as http:
            assert http.post("/v2/models/demo/infer", json=json_request()).status_code == 200
            beating = admin.zrange("ppml:{demo}:workers", 0, -1)
            before = answered_natively(stack)
            worker.process.send_signal(signal.SIGSTOP)
            try:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    sent = time.time()
                    late = pool.submit(http.post, "/v2/models/demo/infer",
                                       json=json_request(),
                                       headers={"X-Request-ID": "trace-42.a"})
                    while not late.done():
                        admin.zadd("ppml:{demo}:workers",
                                   dict.fromkeys(beating, time.time()), xx=True)
                        time.sleep(0.1)
                [(_, record)] = admin.xrange("ppml:{demo}:req")
            finally:
                worker.process.send_signal(signal.SIGCONT)
        answer = late.result()
        assert (answer.status_code, answer.json()) == \
            (504, {"error": "no answer from model 'demo' within 2 s"})
        assert answer.headers["x-request-id"] == "trace-42.a"
        assert record[b"id"] != b"trace-42.a" and len(record[b"id"]) == 32
        assert abs(int(record[b"deadline"]) / 1000 - (sent + 2)) < 0.5
        assert answered_natively(stack) == before + 1
