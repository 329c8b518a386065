"""The model repository end to end: one worker process serving several models and versions,
version routing, the repository API through tritonclient and the project client, loading a
new model and a new version without a restart (the owner's workflow: convert, encrypt,
allow, load), and unloading with requests in flight."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton

from ppml_serve.client import Client, ClientError
from ppml_serve.engines import load_engine
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.queue.contract import HostStatus
from ppml_serve.queue.redis_server import free_port
from tests.conftest import Stack, running_stack, stack_settings
from tests.repository_models import (
    TEXT_LABELS,
    demo_ir,
    keras_savedmodel,
    scaled_demo,
    text_model,
    torch_outputs,
    torchscript_net,
)

IMAGES, _ = demo_samples()
EXPECTED = load_engine("demo", demo_model_path().read_bytes()).infer(
    {"image": IMAGES[:8]})["probabilities"]
FLAT = (IMAGES[:8].reshape(8, 64) / 16).astype(np.float32)
RUN = [sys.executable, "-m", "ppml_serve"]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*RUN, *argv], capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    (root / "digits" / "1").mkdir(parents=True)
    (root / "digits" / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    scaled_demo(root / "digits" / "2" / "model.onnx", 0.5)
    (root / "digits" / "labels.txt").write_text("".join(f"digit {d}\n" for d in range(10)))
    (root / "digits" / "config.yaml").write_text(
        "version_policy: {all: true}\nlabels: labels.txt\ntop_k: 3\n")
    demo_ir(root / "vino" / "1")
    (root / "vino" / "config.yaml").write_text("engine: auto\n")
    source = torchscript_net(root.parent / "sources" / "net.pt")
    converted = cli("model", "convert", str(source), str(root / "torchnet" / "1"),
                    "--input", "x:2,64:float32", "--output", "probabilities")
    assert '"max_abs_diff_vs_source"' in converted.stdout
    keras_reference = keras_savedmodel(root.parent / "sources" / "keras", FLAT)
    np.save(root.parent / "sources" / "keras-reference.npy", keras_reference)
    converted = cli("model", "convert", str(root.parent / "sources" / "keras"),
                    str(root / "kerasnet" / "1"), "--to", "openvino",
                    "--input", "features:8,64:float32")
    # compared with TensorFlow's own output, in the converter
    assert json.loads(converted.stdout)["max_abs_diff_vs_source"] < 1e-5
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    (root / "broken" / "config.yaml").write_text("engine: tensorrt\n")
    text_model(root / "text" / "1" / "model.onnx")
    (root / "text" / "config.yaml").write_text(
        "warmup: {batch_size: 3, runs: 2, data: random}\n")
    (root / "cold" / "1").mkdir(parents=True)  # a warm-up that cannot run: never READY
    (root / "cold" / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    (root / "cold" / "config.yaml").write_text("warmup: {shapes: {pixels: [1, 8, 8]}}\n")
    (root / "gpunet" / "1").mkdir(parents=True)  # a GPU asked of a machine without one
    (root / "gpunet" / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    (root / "gpunet" / "config.yaml").write_text("device: cuda\nexecution_provider: auto\n")
    return root


@pytest.fixture(scope="module")
def stack(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # these workers' metrics are behind TLS and the metrics scope (worker.metrics_tls, _auth)
    settings = stack_settings(tmp_path_factory.mktemp("state"), models={},
                              model_repository=repository,
                              worker={"claim_idle_ms": 1500, "heartbeat_s": 0.3,
                                      "max_batch_delay_ms": 5, "max_deliveries": 3,
                                      "engine_threads": 1, "metrics_tls": True,
                                      "metrics_auth": True})
    with running_stack(settings, worker_metrics_port=free_port()) as local:
        yield Stack(local)


def client_for(stack: Stack) -> Client:
    return Client(stack.url, api_key=stack.api_key, ca_file=stack.ca_file, timeout_s=30)


def triton_client(stack: Stack) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=stack.url.removeprefix("https://"), ssl=True,
                                        ssl_options={"ca_certs": str(stack.ca_file)},
                                        network_timeout=180, connection_timeout=180)


def headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


def hosts(stack: Stack) -> list[HostStatus]:
    table = stack.admin().hgetall("ppml:hosts")
    return [status for status in map(HostStatus.from_json, table.values()) if status]


def test_one_worker_process_serves_every_model_and_reports_what_it_cannot(
        stack: Stack) -> None:
    assert len(stack.workers) == 1
    (host,) = hosts(stack)
    ready = {(model, version) for model, states in host.versions.items()
             for version, status in states.items() if status.state.value == "READY"}
    assert ready == {("digits", "1"), ("digits", "2"), ("vino", "1"), ("torchnet", "1"),
                     ("text", "1"), ("kerasnet", "1")}
    index = client_for(stack).repository_index()
    broken = [row for row in index if row["name"] == "broken"]
    assert broken and all(row["state"] == "UNAVAILABLE" for row in broken)
    assert "engine" in broken[0]["reason"] and "tensorrt" in broken[0]["reason"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        (gpunet,) = [row for row in index if row["name"] == "gpunet"]
        assert gpunet["state"] == "UNAVAILABLE" and "no GPU provider" in gpunet["reason"]
    (cold,) = [row for row in index if row["name"] == "cold"]
    assert cold["state"] == "UNAVAILABLE"
    assert "warmup.shapes: ['pixels'] are not inputs of the model" in cold["reason"]


def test_requests_reach_the_version_they_ask_for(stack: Stack) -> None:
    with client_for(stack) as client:
        newest = client.infer("digits", IMAGES[:8])
        first = client.infer("digits", IMAGES[:8], version="1")
        second = client.infer("digits", IMAGES[:8], version="2")
        assert client.metadata("digits")["versions"] == ["1", "2"]
        with pytest.raises(ClientError) as unknown:
            client.infer("digits", IMAGES[:8], version="9")
    assert unknown.value.status == 404 and "versions: 1, 2" in str(unknown.value)
    np.testing.assert_allclose(first["probabilities"], EXPECTED, rtol=1e-6)
    np.testing.assert_allclose(second["probabilities"], EXPECTED * 0.5, rtol=1e-6)
    np.testing.assert_allclose(newest["probabilities"], second["probabilities"])
    # top-k post-processing from config.yaml, inside the worker
    best = np.argsort(-EXPECTED, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(first["probabilities_topk_indices"], best)
    np.testing.assert_allclose(first["probabilities_topk_scores"],
                               np.take_along_axis(EXPECTED, best, axis=1), rtol=1e-6)
    tc = triton_client(stack)
    try:
        tensor = triton.InferInput("image", [8, 8, 8], "UINT8")
        tensor.set_data_from_numpy(IMAGES[:8])
        pinned = tc.infer("digits", [tensor], model_version="1", headers=headers(stack))
        np.testing.assert_allclose(pinned.as_numpy("probabilities"), EXPECTED, rtol=1e-6)
        assert pinned.get_response()["model_version"] == "1"
        config = tc.get_model_config("digits", headers=headers(stack))
        assert config["version_policy"] == {"all": {}}
        assert '"digit 7"' in config["parameters"]["labels"]["string_value"]
        stats = tc.get_inference_statistics("digits", "1", headers=headers(stack))
        assert stats["model_stats"][0]["version"] == "1"
        assert stats["model_stats"][0]["inference_count"] >= 1
    finally:
        tc.close()


def test_ir_and_converted_models_answer_like_their_sources(stack: Stack,
                                                           repository: Path) -> None:
    with client_for(stack) as client:
        vino = client.infer("vino", IMAGES[:8])["probabilities"]
        converted = client.infer("torchnet", {"x": FLAT})["probabilities"]
        keras = client.infer("kerasnet", {"features": FLAT})["output_0"]
        assert client.metadata("vino")["platform"] == "openvino"
    np.testing.assert_allclose(vino, EXPECTED, atol=1e-5)  # OpenVINO IR, FP32 vs ONNX Runtime
    reference = torch_outputs(repository.parent / "sources" / "net.pt", FLAT)
    np.testing.assert_allclose(converted, reference, atol=1e-5)  # ONNX Runtime vs PyTorch
    # a TensorFlow SavedModel (Keras), served as OpenVINO IR, against TensorFlow itself
    keras_reference = np.load(repository.parent / "sources" / "keras-reference.npy")
    np.testing.assert_allclose(keras, keras_reference, atol=1e-5)


class Load:
    """Requests to one model version from a few threads, every outcome counted."""

    def __init__(self, stack: Stack, model: str, version: str | None = None,
                 threads: int = 4) -> None:
        self.stack, self.model, self.version = stack, model, version
        self.outcomes: Counter[str] = Counter()
        self.wrong = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.started_before: list[float] = []
        """Send times of the requests that got 200, to match against an unload."""
        self._lock = threading.Lock()

    def _run(self) -> None:
        path = f"/v2/models/{self.model}" + (f"/versions/{self.version}" if self.version
                                             else "")
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 8, 8],
                            "data": IMAGES[:2].ravel().tolist()}]}
        with self.stack.http() as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(f"{path}/infer", json=body)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                else:
                    outcome = str(response.status_code)
                    if response.status_code == 200:
                        got = np.array(response.json()["outputs"][0]["data"]).reshape(2, 10)
                        if not np.allclose(got, EXPECTED[:2], atol=1e-5):
                            with self._lock:
                                self.wrong += 1
                        with self._lock:
                            self.started_before.append(sent)
                    elif response.status_code == 503:
                        time.sleep(0.02)
                with self._lock:
                    self.outcomes[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_owner_loads_a_new_encrypted_model_and_a_new_version_without_a_restart(
        stack: Stack, repository: Path) -> None:
    state = str(stack.settings.state_dir)
    run_config = str(stack.settings.state_dir / "run-config.yaml")
    sealed = repository / "sealed" / "1" / "model.ppml"
    sealed.parent.mkdir(parents=True)
    cli("model", "encrypt", str(repository / "vino" / "1"), str(sealed), "--state-dir", state)
    tc = triton_client(stack)
    try:
        with Load(stack, "digits", version="1") as load:
            # Not in the policy yet: the key broker refuses, and says what to do.
            with pytest.raises(triton.InferenceServerException) as refused:
                tc.load_model("sealed", headers=headers(stack))
            assert "model add" in str(refused.value)
            cli("model", "add", str(repository), "sealed", "--config", run_config)
            tc.load_model("sealed", headers=headers(stack))
            assert tc.is_model_ready("sealed", headers=headers(stack))
            with client_for(stack) as client:
                answer = client.infer("sealed", IMAGES[:8])["probabilities"]
            np.testing.assert_allclose(answer, EXPECTED, atol=1e-5)
            # A new version of a model in use: drop it in, allow it, load.
            scaled_demo(repository / "digits" / "3" / "model.onnx", 0.25)
            cli("model", "add", str(repository), "digits", "--config", run_config)
            tc.load_model("digits", headers=headers(stack))
            with client_for(stack) as client:
                third = client.infer("digits", IMAGES[:8], version="3")["probabilities"]
                assert client.metadata("digits")["versions"] == ["1", "2", "3"]
            np.testing.assert_allclose(third, EXPECTED * 0.25, rtol=1e-6)
            time.sleep(0.5)
        index = tc.get_model_repository_index(headers=headers(stack))
        assert {"name": "sealed", "version": "1", "state": "READY", "reason": ""} in index
    finally:
        tc.close()
    assert load.outcomes["200"] > 20 and set(load.outcomes) == {"200"}, load.outcomes
    assert load.wrong == 0


def test_an_explicit_load_reads_config_yaml_again_and_loses_nothing(
        stack: Stack, repository: Path) -> None:
    # found: after editing config.yaml, 'model add' and load, version 1 kept its old config
    run_config = str(stack.settings.state_dir / "run-config.yaml")
    config = repository / "digits" / "config.yaml"
    before = config.read_text()
    tc = triton_client(stack)
    try:
        with Load(stack, "digits", version="1") as load:
            config.write_text(before.replace("top_k: 3", "top_k: 2"))
            cli("model", "add", str(repository), "digits", "--config", run_config)
            tc.load_model("digits", headers=headers(stack))
            with client_for(stack) as client:
                reloaded = client.infer("digits", IMAGES[:8], version="1")
            # a config.yaml that no longer reads: the load says why, the old load serves on
            config.write_text("top_k: [not a number]\n")
            with pytest.raises(triton.InferenceServerException) as refused:
                tc.load_model("digits", headers=headers(stack))
            with client_for(stack) as client:
                kept = client.infer("digits", IMAGES[:8], version="1")
            time.sleep(0.5)
    finally:
        config.write_text(before)
        cli("model", "add", str(repository), "digits", "--config", run_config)
        tc.load_model("digits", headers=headers(stack))
        tc.close()
    best = np.argsort(-EXPECTED, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(reloaded["probabilities_topk_indices"], best)
    np.testing.assert_array_equal(kept["probabilities_topk_indices"], best)
    assert "top_k" in str(refused.value) and "still serving" in str(refused.value)
    assert load.outcomes["200"] > 20 and set(load.outcomes) == {"200"}, load.outcomes
    assert load.wrong == 0


def test_repository_workers_get_a_metrics_port_too(stack: Stack) -> None:
    # found: workers started for a model repository by 'up --worker-metrics-port' had none
    with client_for(stack) as client:
        client.infer("digits", IMAGES[:2], version="1")
    (address,) = stack.local.worker_metrics
    assert address.startswith("https://")
    with httpx.Client(verify=str(stack.ca_file), timeout=10) as https:
        assert https.get(address).status_code == 401  # metrics_auth: the metrics scope
        text = https.get(address, headers=headers(stack)).text
        # the readiness probe of the Kubernetes manifests (serving, the queue reachable)
        ready = https.get(address.removesuffix("/metrics") + "/ready")
    assert 'ppml_worker_items_total{model="digits",outcome="ok",version="1"}' in text
    assert ready.status_code == 200 and ready.text == "ready\n"


def test_a_load_with_a_failing_version_is_400_with_its_reasons_and_audited(
        stack: Stack, repository: Path) -> None:
    # found: loading a version the key broker refused answered 200 {} (the index said
    # UNAVAILABLE, the audit log "loaded") because other versions of the model served
    scaled_demo(repository / "digits" / "9" / "model.onnx", 0.3)  # never 'model add'-ed
    http = httpx.Client(base_url=stack.url, verify=str(stack.ca_file), headers=headers(stack),
                        timeout=180)
    try:
        refused = http.post("/v2/repository/models/digits/load", json={})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert "version 9" in error and "model add" in error, error
        assert "still serving: version 1" in error, error
        with client_for(stack) as client:  # the versions that were there still answer
            answer = client.infer("digits", IMAGES[:8], version="1")["probabilities"]
        np.testing.assert_allclose(answer, EXPECTED, atol=1e-5)
        audit = stack.settings.audit_log("gateway").read_text()
        assert "'digits': load by key" in audit and "failed" in audit, audit[-500:]
        missing = http.post("/v2/repository/models/nowhere/load", json={})
        assert missing.status_code == 404 and "ppml-serve model add" in missing.json()["error"]
    finally:
        shutil.rmtree(repository / "digits" / "9")
        assert http.post("/v2/repository/models/digits/load", json={}).status_code == 200
        http.close()


def test_unload_answers_the_requests_in_flight_then_stops_serving(stack: Stack) -> None:
    tc = triton_client(stack)
    try:
        with Load(stack, "vino", threads=8) as load:
            time.sleep(1.0)
            unload_sent = time.monotonic()
            tc.unload_model("vino", headers=headers(stack))
            unloaded = time.monotonic()
            time.sleep(0.5)
        assert not tc.is_model_ready("vino", headers=headers(stack))
        states = {row["state"] for row in tc.get_model_repository_index(headers=headers(stack))
                  if row["name"] == "vino"}
        assert states == {"UNAVAILABLE"}
        # Only answers and "not serving (any more)": nothing lost, nothing broken.
        assert set(load.outcomes) <= {"200", "503"}, load.outcomes
        assert load.wrong == 0
        assert any(unload_sent <= sent < unloaded for sent in load.started_before) or \
            load.outcomes["200"] > 0
        tc.load_model("vino", headers=headers(stack))
        assert tc.is_model_ready("vino", headers=headers(stack))
    finally:
        tc.close()


def test_repository_api_needs_an_admin_key(stack: Stack) -> None:
    token = cli("keys", "add-api-key", "--name", "reader", "--state-dir",
                str(stack.settings.state_dir)).stdout.split()[-1]
    with stack.http(api_key=token) as http:
        deadline = time.monotonic() + 10  # the gateway picks new keys up within a second
        while http.get("/v2/models/digits").status_code == 401 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.post("/v2/repository/models/digits/unload").status_code == 403
        assert http.post("/v2/repository/index").status_code == 403
    with stack.http() as http:
        unknown = http.post("/v2/repository/models/nothing/load")
        files = http.post("/v2/repository/models/digits/load",
                          json={"parameters": {"file:1/model.onnx": "AAAA"}})
    assert unknown.status_code == 404
    assert files.status_code == 400 and "model add" in files.json()["error"]


def test_the_repository_api_over_grpc(stack: Stack) -> None:
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(stack.local.grpc_address, ssl=True,
                                               root_certificates=str(stack.ca_file))
    auth = {"authorization": f"Bearer {stack.api_key}"}
    try:
        index = client.get_model_repository_index(headers=auth, as_json=True)["models"]
        assert {"name": "torchnet", "version": "1", "state": "READY"} in index
        client.unload_model("torchnet", headers=auth)
        assert not client.is_model_ready("torchnet", headers=auth)
        client.load_model("torchnet", headers=auth)
        assert client.is_model_ready("torchnet", headers=auth)
        tensor = triton_grpc.InferInput("x", [8, 64], "FP32")
        tensor.set_data_from_numpy(FLAT)
        pinned = client.infer("torchnet", [tensor], model_version="1", headers=auth)
        assert pinned.get_response().model_version == "1"
        with pytest.raises(triton_grpc.InferenceServerException) as refused:
            client.get_model_repository_index(headers={})
        assert "UNAUTHENTICATED" in str(refused.value.status())
    finally:
        client.close()


def test_text_models_take_and_answer_bytes_tensors(stack: Stack) -> None:
    """BYTES tensors end to end: JSON strings, the binary extension, gRPC raw and typed
    contents and the project client, through gateway, Redis and an ONNX Runtime worker."""
    import tritonclient.grpc as triton_grpc

    words = ["spam", "ham", "été", ""]
    labels = [TEXT_LABELS.get(word, -1) for word in words]
    expected_echo = np.array([word.encode() for word in words], dtype=object)
    text = np.array(words, dtype=object)

    plain = stack.http().post("/v2/models/text/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [4], "data": words}]})
    assert plain.status_code == 200, plain.text
    outputs = {item["name"]: item for item in plain.json()["outputs"]}
    assert outputs["echo"] == {"name": "echo", "datatype": "BYTES", "shape": [4],
                               "data": words}
    assert outputs["label"]["data"] == labels

    http_client = triton_client(stack)
    try:
        for binary_in in (True, False):
            tensor = triton.InferInput("text", [4], "BYTES")
            tensor.set_data_from_numpy(text, binary_data=binary_in)
            asked = [triton.InferRequestedOutput("echo", binary_data=not binary_in),
                     triton.InferRequestedOutput("label")]
            result = http_client.infer("text", [tensor], outputs=asked, headers=headers(stack))
            echo = result.as_numpy("echo")  # tritonclient: bytes if binary, str from JSON
            assert [item.encode() if binary_in else item for item in echo] == list(expected_echo)
            np.testing.assert_array_equal(result.as_numpy("label"), labels)
        assert http_client.get_model_metadata("text", headers=headers(stack))["inputs"] == [
            {"name": "text", "datatype": "BYTES", "shape": [-1]}]
        # its config.yaml's warm-up ran before it was READY, as its config says
        config = http_client.get_model_config("text", headers=headers(stack))
        (warmup,) = config["model_warmup"]
        assert (warmup["batch_size"], warmup["count"]) == (3, 2)
        assert warmup["inputs"]["text"] == {"data_type": "TYPE_BYTES", "dims": [],
                                            "random_data": True}
        assert float(config["parameters"]["warmup_seconds"]["string_value"]) > 0
    finally:
        http_client.close()

    grpc_client = triton_grpc.InferenceServerClient(stack.local.grpc_address, ssl=True,
                                                    root_certificates=str(stack.ca_file))
    auth = {"authorization": f"Bearer {stack.api_key}"}
    try:
        tensor = triton_grpc.InferInput("text", [4], "BYTES")
        tensor.set_data_from_numpy(text)
        result = grpc_client.infer("text", [tensor], headers=auth)
        np.testing.assert_array_equal(result.as_numpy("echo"), expected_echo)
        np.testing.assert_array_equal(result.as_numpy("label"), labels)
    finally:
        grpc_client.close()

    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    credentials = grpc.ssl_channel_credentials(stack.ca_file.read_bytes())
    with grpc.secure_channel(stack.local.grpc_address, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="text")
        typed = request.inputs.add(name="text", datatype="BYTES", shape=[2])
        typed.contents.bytes_contents.extend([b"ham", b"spam"])
        response = stub.ModelInfer(request, metadata=tuple(auth.items()), timeout=30)
    label_at = [output.name for output in response.outputs].index("label")
    assert np.frombuffer(response.raw_output_contents[label_at], np.int64).tolist() == [0, 1]

    with client_for(stack) as client:  # numpy str arrays go as BYTES
        answered = client.infer("text", {"text": np.array(["ham", "x"])})
        np.testing.assert_array_equal(answered["echo"], np.array([b"ham", b"x"], dtype=object))
        np.testing.assert_array_equal(answered["label"], [0, -1])

    # not UTF-8 (ONNX strings are): that request alone is refused, in words that say so
    body, extra = encode_bytes_request([b"ham", b"\xff\xfe"])
    refused = stack.http().post("/v2/models/text/infer", content=body, headers=extra)
    assert refused.status_code == 400 and "UTF-8" in refused.json()["error"], refused.text
    body, extra = encode_bytes_request([b"ham"], declared=2)
    malformed = stack.http().post("/v2/models/text/infer", content=body, headers=extra)
    assert malformed.status_code == 400
    assert "BYTES data has 1 elements but shape [2] needs 2" in malformed.json()["error"]


def encode_bytes_request(items: list[bytes], declared: int | None = None
                         ) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request of one BYTES input (``declared`` elements in its shape)."""
    import json

    data = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    header = json.dumps({"inputs": [{
        "name": "text", "datatype": "BYTES", "shape": [declared or len(items)],
        "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}
