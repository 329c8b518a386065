"""End to end through HTTPS gateway, TLS Redis Streams and worker processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from ppml_serve.client import AsyncClient, Client, ClientError
from ppml_serve.codecs import record
from ppml_serve.crypto.envelope import REPLY, REQUEST, associated_data
from ppml_serve.engines import load_engine
from ppml_serve.gateway.auth import add_api_key
from ppml_serve.models import demo_model_path, demo_samples

from .conftest import MAX_REQUEST_BYTES, RedisCommands, Stack

IMAGES, LABELS = demo_samples()


def local_predictions(images: np.ndarray) -> np.ndarray:
    """The same model run in-process: what every answer through the pipeline must equal."""
    engine = load_engine("demo", demo_model_path().read_bytes())
    return engine.infer({"image": images})["probabilities"].argmax(axis=1)


def client_for(stack: Stack) -> Client:
    return Client(stack.url, api_key=stack.api_key, ca_file=stack.ca_file)


def test_json_inference_classifies_digits(stack: Stack) -> None:
    body = {"id": "req-1", "inputs": [{"name": "image", "datatype": "UINT8", "shape": [4, 8, 8],
                                       "data": IMAGES[:4].ravel().tolist()}]}
    with stack.http() as http:
        response = http.post("/v2/models/demo/infer", json=body)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["id"] == "req-1"
    (output,) = document["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [4, 10]
    probabilities = np.asarray(output["data"], dtype=np.float32).reshape(4, 10)
    assert (probabilities.argmax(axis=1) == local_predictions(IMAGES[:4])).all()


def test_binary_inference_with_project_client(stack: Stack) -> None:
    with client_for(stack) as client:
        outputs = client.infer("demo", IMAGES[:32])
    assert outputs["probabilities"].shape == (32, 10)
    accuracy = (outputs["probabilities"].argmax(axis=1) == LABELS[:32]).mean()
    assert accuracy >= 0.9


async def test_async_client(stack: Stack) -> None:
    async with AsyncClient(stack.url, api_key=stack.api_key, ca_file=stack.ca_file) as client:
        results = await asyncio.gather(*(client.infer("demo", IMAGES[i:i + 1])
                                         for i in range(16)))
    predicted = [int(result["probabilities"].argmax()) for result in results]
    assert predicted == local_predictions(IMAGES[:16]).tolist()


def _triton_http(stack: Stack) -> tuple[triton.InferenceServerClient, dict[str, str]]:
    client = triton.InferenceServerClient(url=stack.url.removeprefix("https://"), ssl=True,
                                          ssl_options={"ca_certs": str(stack.ca_file)})
    return client, {"Authorization": f"Bearer {stack.api_key}"}


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_over_tls(stack: Stack, binary: bool) -> None:
    client, headers = _triton_http(stack)
    try:
        assert client.is_server_live()
        metadata = client.get_model_metadata("demo", headers=headers)
        assert metadata["inputs"][0]["name"] == "image"
        tensor = triton.InferInput("image", [3, 8, 8], "UINT8")
        tensor.set_data_from_numpy(IMAGES[:3], binary_data=binary)
        wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("demo", [tensor], outputs=[wanted], headers=headers)
        probabilities = result.as_numpy("probabilities")
    finally:
        client.close()
    assert probabilities.shape == (3, 10)
    assert (probabilities.argmax(axis=1) == local_predictions(IMAGES[:3])).all()


@pytest.mark.parametrize("binary", [True, False])
def test_the_classification_extension_through_tritonclient(stack: Stack, binary: bool) -> None:
    # found: class_count was silently ignored (the raw scores came back)
    client, headers = _triton_http(stack)
    try:
        tensor = triton.InferInput("image", [3, 8, 8], "UINT8")
        tensor.set_data_from_numpy(IMAGES[:3])
        wanted = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)
        classes = client.infer("demo", [tensor], outputs=[wanted],
                               headers=headers).as_numpy("probabilities")
        with pytest.raises(triton.InferenceServerException, match="positive integer"):
            bad = triton.InferRequestedOutput("probabilities", class_count=0)
            bad._parameters["classification"] = 0  # tritonclient leaves 0 out
            client.infer("demo", [tensor], outputs=[bad], headers=headers)
    finally:
        client.close()
    assert classes.shape == (3, 2)
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": IMAGES[:3]})["probabilities"]
    for row, scores in zip(classes, expected, strict=True):
        best = [item.decode() if isinstance(item, bytes) else str(item) for item in row]
        score, index = best[0].split(":")[:2]
        assert int(index) == int(scores.argmax())
        assert abs(float(score) - float(scores.max())) < 1e-5
        assert int(best[1].split(":")[1]) == int(np.argsort(-scores)[1])


def _batch_counts(stack: Stack) -> tuple[float, float]:
    with stack.http() as http:
        text = http.get("/metrics").text
    singles = float(re.search(
        r'ppml_batch_size_bucket\{le="1.0",model="demo",version="1"\} (\S+)', text).group(1))
    total = float(re.search(r'ppml_batch_size_count\{model="demo",version="1"\} (\S+)',
                            text).group(1))
    return singles, total


async def test_concurrent_requests_are_batched(stack: Stack) -> None:
    singles_before, total_before = _batch_counts(stack)
    async with AsyncClient(stack.url, api_key=stack.api_key, ca_file=stack.ca_file) as client:
        await asyncio.gather(*(client.infer("demo", IMAGES[i % 64:i % 64 + 1])
                               for i in range(200)))
    singles, total = _batch_counts(stack)
    assert total - total_before == 200
    assert (total - total_before) - (singles - singles_before) > 0, "no batch larger than 1"


def test_redis_never_sees_plaintext(stack: Stack) -> None:
    marker = b"SECRET-PATIENT-7f3a9c"
    image = np.frombuffer((marker * 4)[:64], dtype=np.uint8).reshape(1, 8, 8)
    admin = stack.admin()
    with RedisCommands(admin) as captured, client_for(stack) as client:
        client.infer("demo", image)
    commands = captured.text
    assert "ppml:{demo}:req" in commands, "MONITOR did not capture the request"
    assert marker.decode() not in commands
    assert marker.hex() not in commands.replace("\\x", "")
    admin.save()  # a dump of everything Redis holds now (the reply stream included)
    for file in (stack.settings.state_dir / "redis").rglob("*"):
        if file.is_file():
            assert marker not in file.read_bytes(), f"plaintext marker found in {file}"


def _sealed_request(stack: Stack, request_id: str) -> bytes:
    keyring = stack.keyring()
    return keyring.seal(record.pack({"image": IMAGES[:1]}),
                        associated_data("demo", request_id, REQUEST))


def _await_replies(stack: Stack, stream: str, count: int) -> dict[str, dict[bytes, bytes]]:
    admin = stack.admin()
    replies: dict[str, dict[bytes, bytes]] = {}
    deadline = time.monotonic() + 20
    while len(replies) < count and time.monotonic() < deadline:
        for _, entries in admin.xread({stream: "0-0"}, block=500) or []:
            for _, fields in entries:
                replies[fields[b"id"].decode()] = fields
    return replies


def test_tampered_record_is_refused_and_batch_mates_answered(stack: Stack) -> None:
    admin = stack.admin()
    stream = "ppml:{demo}:reply:test-tamper"
    good = _sealed_request(stack, "good-1")
    bad = bytearray(_sealed_request(stack, "bad-1"))
    bad[-20] ^= 0x01
    swapped = _sealed_request(stack, "other-id")  # a valid record moved to another request
    deadline = str(int(time.time() * 1000) + 60_000)
    pipe = admin.pipeline(transaction=False)
    for request_id, body in (("good-1", good), ("bad-1", bytes(bad)), ("swap-1", swapped)):
        pipe.xadd("ppml:{demo}:req", {"id": request_id, "reply": stream, "body": body,
                                    "deadline": deadline})
    pipe.execute()
    replies = _await_replies(stack, stream, 3)
    keyring = stack.keyring()

    def opened(request_id: str) -> bytes:
        return keyring.open(replies[request_id][b"body"],
                            associated_data("demo", request_id, REPLY))

    assert replies["good-1"][b"ok"] == b"1"
    _, outputs = record.unpack(opened("good-1"))
    assert int(outputs["probabilities"].argmax()) == local_predictions(IMAGES[:1])[0]
    for request_id in ("bad-1", "swap-1"):
        assert replies[request_id][b"ok"] == b"0"
        assert json.loads(opened(request_id))["kind"] == "integrity"


def test_poison_request_goes_to_dead_letter_with_error_answer(stack: Stack) -> None:
    admin = stack.admin()
    stream = "ppml:{demo}:reply:test-dead"
    # A consumer that takes the request and never answers, as a crashing worker would; in one
    # transaction so that no live worker reads it first. RETRYCOUNT makes it look delivered
    # many times already.
    pipe = admin.pipeline(transaction=True)
    pipe.xadd("ppml:{demo}:req", {"id": "poison-1", "reply": stream,
                                "body": _sealed_request(stack, "poison-1"),
                                "deadline": str(int(time.time() * 1000) + 60_000)})
    pipe.xreadgroup("workers", "ghost", {"ppml:{demo}:req": ">"}, count=1)
    entry_id = pipe.execute()[0]
    admin.xclaim("ppml:{demo}:req", "workers", "ghost", 0, [entry_id], retrycount=5)
    replies = _await_replies(stack, stream, 1)
    assert replies["poison-1"][b"ok"] == b"0"
    keyring = stack.keyring()
    problem = json.loads(keyring.open(replies["poison-1"][b"body"],
                                      associated_data("demo", "poison-1", REPLY)))
    assert problem["kind"] == "dead_letter"
    dead = admin.xrange("ppml:{demo}:dead")
    assert any(fields[b"id"] == b"poison-1" for _, fields in dead)


@pytest.mark.parametrize("api_key", [None, "ppml_wrong-key"])
def test_missing_or_wrong_api_key_is_401(stack: Stack, api_key: str | None) -> None:
    with stack.http(api_key=api_key) as http:
        response = http.post("/v2/models/demo/infer", json={"inputs": []})
        metadata = http.get("/v2/models/demo")
    assert response.status_code == 401
    assert response.json() == {"error": "missing or invalid API key"}
    assert metadata.status_code == 401


def _infer_json(stack: Stack, model: str, inputs: list[dict[str, Any]]) -> Any:
    with stack.http() as http:
        return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs})


def test_wrong_shape_or_dtype_is_400_naming_the_input(stack: Stack) -> None:
    shape = _infer_json(stack, "demo", [{"name": "image", "datatype": "UINT8",
                                         "shape": [1, 9, 9], "data": [0] * 81}])
    dtype = _infer_json(stack, "demo", [{"name": "image", "datatype": "FP32",
                                         "shape": [1, 8, 8], "data": [0.0] * 64}])
    unknown = _infer_json(stack, "demo", [{"name": "pixels", "datatype": "UINT8",
                                           "shape": [1, 8, 8], "data": [0] * 64}])
    for response in (shape, dtype, unknown):
        assert response.status_code == 400
    assert "'image'" in shape.json()["error"] and "shape" in shape.json()["error"]
    assert "'image'" in dtype.json()["error"] and "FP32" in dtype.json()["error"]
    assert "'pixels'" in unknown.json()["error"]


def test_malformed_body_is_400(stack: Stack) -> None:
    with stack.http() as http:
        response = http.post("/v2/models/demo/infer", content=b"{not json")
    assert response.status_code == 400
    assert response.json() == {"error": "request body is not valid JSON"}


def test_unknown_model_is_404(stack: Stack) -> None:
    response = _infer_json(stack, "no-such-model", [{"name": "image", "datatype": "UINT8",
                                                     "shape": [1, 8, 8], "data": [0] * 64}])
    assert response.status_code == 404
    assert "no-such-model" in response.json()["error"]


def test_oversized_body_is_413(stack: Stack) -> None:
    with stack.http() as http:
        response = http.post("/v2/models/demo/infer", content=b"x" * (MAX_REQUEST_BYTES + 1))
    assert response.status_code == 413


def test_health_and_metadata(stack: Stack) -> None:
    with stack.http(api_key=None) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").status_code == 200
        server = http.get("/v2").json()
    assert server["extensions"] == ["binary_tensor_data"]
    assert "NO hardware protection" in server["security"]["worker_attestation"]
    with stack.http() as http:
        assert http.get("/v2/models/demo/ready").json() == {"name": "demo", "ready": True}


def test_the_openapi_document_has_a_browsable_page_served_locally(stack: Stack) -> None:
    with stack.http(api_key=None) as http:
        page = http.get("/v2/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # every script and style comes from this gateway: no CDN, and the policy says so
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(source.startswith("/v2/docs/") for source in sources)
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for source in sources:
            asset = http.get(source)
            assert asset.status_code == 200 and asset.content, source
        assert "/v2/openapi.json" in http.get("/v2/docs/init.js").text
        assert "SwaggerUIBundle" in http.get("/v2/docs/swagger-ui-bundle.js").text
        for probe in ("/v2/docs/index.html", "/v2/docs/..%2F..%2Fpyproject.toml",
                      "/v2/docs/swagger-ui.js.map"):
            assert http.get(probe).status_code == 404, probe
        assert http.get("/v2/openapi.json").json()["openapi"].startswith("3.")


def test_killed_worker_loses_no_request(stack: Stack) -> None:
    """SIGKILL a worker while it holds requests; another worker reclaims and answers them."""
    victim = stack.workers[0]
    assert victim.process is not None
    pid = victim.process.pid
    admin = stack.admin()
    results: list[Any] = []

    async def load() -> None:
        async with AsyncClient(stack.url, api_key=stack.api_key, ca_file=stack.ca_file) as client:
            semaphore = asyncio.Semaphore(24)

            async def one(index: int) -> None:
                async with semaphore:
                    output = await client.infer("demo", IMAGES[index % 64:index % 64 + 1])
                    results.append((index, int(output["probabilities"].argmax())))

            await asyncio.gather(*(one(i) for i in range(300)))

    thread = threading.Thread(target=lambda: asyncio.run(load()))
    thread.start()
    killed_with_pending = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and thread.is_alive():
        consumers = admin.xinfo_consumers("ppml:{demo}:req", "workers")
        mine = [c for c in consumers if f"-{pid}-" in str(c["name"])]
        if mine and mine[0]["pending"] > 0:
            victim.process.send_signal(signal.SIGKILL)
            killed_with_pending = True
            break
        time.sleep(0.005)
    thread.join(60)
    victim.wait(5)
    stack.replace_worker(victim)
    assert killed_with_pending, "the worker never held a request to lose"
    assert len(results) == 300
    expected = local_predictions(IMAGES[:64])
    assert all(predicted == expected[index % 64] for index, predicted in results)


def test_client_error_carries_status(stack: Stack) -> None:
    with Client(stack.url, api_key="ppml_wrong", ca_file=stack.ca_file) as client, \
            pytest.raises(ClientError) as caught:
        client.infer("demo", IMAGES[:1])
    assert caught.value.status == 401


def test_worker_metrics_endpoint(stack: Stack) -> None:
    from ppml_serve.queue.redis_server import free_port

    port = free_port()
    extra = stack.local.child("worker metrics",
                              [*stack.workers[0].argv, "--metrics-port", str(port)])
    extra.start(stack.local._env)
    try:
        text = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "ppml_worker_batch_size_count" not in text:
            with client_for(stack) as client:
                for index in range(8):
                    client.infer("demo", IMAGES[index:index + 1])
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                time.sleep(0.2)
        assert 'ppml_worker_items_total{model="demo",outcome="ok",version="1"}' in text
        assert "ppml_worker_engine_seconds_bucket" in text
        # found: no process_* metrics, and nothing said which build a part runs
        assert "process_cpu_seconds_total" in text and 'part="worker"' in text
        with stack.http() as http:
            gateway = http.get("/metrics").text
        assert "process_resident_memory_bytes" in gateway
        assert re.search(r'ppml_build_info\{part="gateway",python="[0-9.]+",version="', gateway)
    finally:
        extra.terminate()
        extra.wait(10)


def test_job_enqueued_now_fetched_later(stack: Stack) -> None:
    marker = b"JOB-MARKER-5e1d"
    image = np.frombuffer((marker * 5)[:64], dtype=np.uint8).reshape(1, 8, 8)
    with client_for(stack) as client:
        job_id = client.submit("demo", np.concatenate([IMAGES[:3], image]))
        outputs = client.result("demo", job_id, wait_s=20)
        assert outputs is not None
        expected = local_predictions(np.concatenate([IMAGES[:3], image]))
        assert (outputs["probabilities"].argmax(axis=1) == expected).all()
        again = client.result("demo", job_id)  # results stay fetchable until they expire
        assert again is not None and np.array_equal(again["probabilities"],
                                                    outputs["probabilities"])
        with pytest.raises(ClientError) as caught:
            client.result("demo", "0" * 32)
        assert caught.value.status == 404
    stored = stack.admin().hgetall(f"ppml:{{demo}}:job:{job_id}")
    assert stored[b"state"] == b"done" and stored[b"body"][:2] == b"PE"  # sealed, as sent
    assert marker not in b"".join(stored.values())
    assert 0 < stack.admin().ttl(f"ppml:{{demo}}:job:{job_id}") <= 3600


def test_metrics_split_queue_wait_from_engine_time_and_show_the_queue(stack: Stack) -> None:
    with client_for(stack) as client:
        for index in range(5):
            client.infer("demo", IMAGES[index:index + 1])
    with stack.http() as http:
        text = http.get("/metrics").text

    def value(pattern: str) -> float:
        found = re.search(pattern + r" (\S+)", text)
        assert found, f"{pattern} not in /metrics"
        return float(found.group(1))

    assert value(r'ppml_queue_wait_seconds_count\{model="demo",version="1"\}') >= 5
    assert value(r'ppml_engine_seconds_count\{model="demo",version="1"\}') >= 5
    assert value(r'ppml_engine_seconds_sum\{model="demo",version="1"\}') > 0
    assert value(r'ppml_requests_total\{model="demo",status="200",version="1"\}') >= 5
    assert value(r'ppml_live_workers\{model="demo",version="1"\}') == 2
    assert value(r'ppml_queue_lag\{model="demo",version="1"\}') >= 0
    assert value(r'ppml_inflight_requests\{model="demo",version="1"\}') >= 0
    # answered by the front's native path, and counted as the app counts its own
    assert value(r"\nppml_front_native_answers_total") >= 5
    with stack.http(api_key="ppml_wrong") as http:  # refused calls are counted too
        http.post("/v2/models/demo/infer", json={"inputs": []})
    with stack.http() as http:
        text = http.get("/metrics").text
    assert value(r'ppml_requests_total\{model="demo",status="401",version="-"\}') >= 1


def test_async_client_has_the_whole_client_api() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert public(Client) - {"__enter__", "__exit__"} == public(AsyncClient)


def test_a_record_cannot_direct_answers_to_another_key(stack: Stack) -> None:
    """The reply field is the requester's to set: a worker posts only to the model's own
    reply streams, so a forged entry cannot make it write over any other key."""
    admin = stack.admin()
    body = _sealed_request(stack, "evil-1")
    deadline = str(int(time.time() * 1000) + 60_000)
    entry = admin.xadd("ppml:{demo}:req", {"id": "evil-1", "reply": "ppml:models",
                                           "body": body, "deadline": deadline})
    started = time.monotonic()
    while time.monotonic() - started < 20 and admin.xrange("ppml:{demo}:req", entry, entry):
        time.sleep(0.1)
    assert not admin.xrange("ppml:{demo}:req", entry, entry), "the entry was never acked"
    assert admin.type("ppml:models") == b"hash" and admin.hexists("ppml:models", "demo")


def test_versions_config_stats_and_repository_index_through_tritonclient(stack: Stack) -> None:
    client = triton.InferenceServerClient(
        url=stack.url.removeprefix("https://"), ssl=True,
        ssl_options={"ca_certs": str(stack.ca_file)})
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    try:
        tensor = triton.InferInput("image", [2, 8, 8], "UINT8")
        tensor.set_data_from_numpy(IMAGES[:2])
        pinned = client.infer("demo", [tensor], model_version="1", headers=headers)
        assert pinned.as_numpy("probabilities").shape == (2, 10)
        with pytest.raises(triton.InferenceServerException) as caught:
            client.infer("demo", [tensor], model_version="7", headers=headers)
        assert "has no version '7'" in str(caught.value)
        config = client.get_model_config("demo", headers=headers)
        assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [8, 8]}]
        assert config["max_batch_size"] == stack.settings.worker.max_rows_per_request
        stats = client.get_inference_statistics("demo", headers=headers)["model_stats"][0]
        assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1
        assert stats["inference_stats"]["queue"]["count"] >= 1
        assert stats["inference_stats"]["compute_infer"]["ns"] > 0
        index = client.get_model_repository_index(headers=headers)
        assert {"name": "demo", "version": "1", "state": "READY", "reason": ""} in index
    finally:
        client.close()
    infer_only = add_api_key(stack.settings.api_keys_file, "no-admin", ["*"])
    time.sleep(1.1)  # key files are re-read at most once a second
    with stack.http(api_key=infer_only) as http:
        assert http.post("/v2/repository/index").status_code == 403
        assert http.get("/v2/models/demo/versions/7").status_code == 404
