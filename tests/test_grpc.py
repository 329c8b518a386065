"""The KServe v2 gRPC API over TLS: the unmodified tritonclient.grpc client, raw and typed
tensor contents, API keys in metadata, errors as gRPC status codes."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from ppml_serve.engines import load_engine
from ppml_serve.models import demo_model_path, demo_samples

from .conftest import Stack

IMAGES, _ = demo_samples()


def _expected(images: np.ndarray) -> np.ndarray:
    engine = load_engine("demo", demo_model_path().read_bytes())
    return engine.infer({"image": images})["probabilities"]


@pytest.fixture
def client(stack: Stack) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(stack.local.grpc_address, ssl=True,
                                          root_certificates=str(stack.ca_file))
    try:
        yield client
    finally:
        client.close()


def test_tritonclient_grpc_infers_with_raw_contents(stack: Stack,
                                                    client: triton.InferenceServerClient) -> None:
    headers = {"authorization": f"Bearer {stack.api_key}"}
    assert client.is_server_live()
    assert client.is_model_ready("demo", headers=headers)
    metadata = client.get_model_metadata("demo", headers=headers)
    assert metadata.inputs[0].name == "image" and metadata.inputs[0].datatype == "UINT8"
    tensor = triton.InferInput("image", [4, 8, 8], "UINT8")
    tensor.set_data_from_numpy(IMAGES[:4])
    result = client.infer("demo", [tensor], headers=headers,
                          outputs=[triton.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), _expected(IMAGES[:4]),
                               rtol=1e-5)


def test_typed_contents_are_accepted(stack: Stack) -> None:
    credentials = grpc.ssl_channel_credentials(stack.ca_file.read_bytes())
    with grpc.secure_channel(stack.local.grpc_address, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="demo")
        tensor = request.inputs.add(name="image", datatype="UINT8", shape=[2, 8, 8])
        tensor.contents.uint_contents.extend(IMAGES[:2].ravel().tolist())
        response = stub.ModelInfer(request, metadata=[("authorization",
                                                       f"Bearer {stack.api_key}")])
    (output,) = response.outputs
    probabilities = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        list(output.shape))
    np.testing.assert_allclose(probabilities, _expected(IMAGES[:2]), rtol=1e-5)


@pytest.mark.parametrize(("model", "key", "status"), [
    ("demo", "ppml_wrong", "StatusCode.UNAUTHENTICATED"),
    ("nope", None, "StatusCode.NOT_FOUND"),
])
def test_errors_are_grpc_status_codes(stack: Stack, client: triton.InferenceServerClient,
                                      model: str, key: str | None, status: str) -> None:
    tensor = triton.InferInput("image", [1, 8, 8], "UINT8")
    tensor.set_data_from_numpy(IMAGES[:1])
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [tensor], headers={"authorization": f"Bearer {key or stack.api_key}"})
    assert caught.value.status() == status


def test_bad_tensor_is_invalid_argument(stack: Stack, client: triton.InferenceServerClient
                                        ) -> None:
    tensor = triton.InferInput("image", [1, 8, 9], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 8, 9), np.uint8))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("demo", [tensor], headers={"authorization": f"Bearer {stack.api_key}"})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 8, 9] does not match" in caught.value.message()


def test_malformed_and_unknown_rpcs_get_our_words_and_no_traceback(stack: Stack) -> None:
    """Found from outside: a keyless caller's malformed or unknown RPC logged ~1 KB of
    traceback at ERROR per call and answered with a Python exception's words."""
    gateway_log = stack.local.log_dir / "gateway.log"
    before = gateway_log.stat().st_size
    credentials = grpc.ssl_channel_credentials(stack.ca_file.read_bytes())
    with grpc.secure_channel(stack.local.grpc_address, credentials) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as malformed:
            infer(b"\xff\xff\xff not a protobuf message", timeout=10)
        unknown = channel.unary_unary(
            "/inference.GRPCInferenceService/SystemSharedMemoryStatus")
        with pytest.raises(grpc.RpcError) as streaming:
            unknown(b"", timeout=10)
        elsewhere = channel.unary_unary("/some.Other/Thing")
        with pytest.raises(grpc.RpcError) as other:
            elsewhere(b"", timeout=10)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest message" in malformed.value.details()
    for refused in (streaming.value, other.value):
        assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    # Triton's shared memory: why it is not served (as HTTP's 501 says); anything else:
    # what this server is
    assert "shared memory is not supported by ppml-serve" in streaming.value.details()
    assert "this server implements inference.GRPCInferenceService" in other.value.details()
    with gateway_log.open() as handle:
        handle.seek(before)
        logged = handle.read()
    assert "Traceback" not in logged and "Exception deserializing" not in logged, logged[-2000:]


def test_model_config_and_statistics_over_grpc(stack: Stack,
                                               client: triton.InferenceServerClient) -> None:
    # found: ModelConfig and ModelStatistics answered a generic UNIMPLEMENTED
    headers = {"authorization": f"Bearer {stack.api_key}"}
    tensor = triton.InferInput("image", [1, 8, 8], "UINT8")
    tensor.set_data_from_numpy(IMAGES[:1])
    client.infer("demo", [tensor], headers=headers)
    config = client.get_model_config("demo", headers=headers).config
    assert config.name == "demo" and config.input[0].name == "image"
    assert config.input[0].data_type == model_config_pb2.DataType.Value("TYPE_UINT8")
    one = client.get_inference_statistics("demo", headers=headers).model_stats
    assert [(s.name, s.version) for s in one] == [("demo", "1")]
    assert one[0].inference_count >= 1 and one[0].inference_stats.success.count >= 1
    every = client.get_inference_statistics(headers=headers).model_stats
    assert "demo" in {s.name for s in every}
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.get_inference_statistics()


def test_a_stream_of_ordinary_requests_is_answered_in_order(
        stack: Stack, client: triton.InferenceServerClient) -> None:
    # found: ModelStreamInfer answered a generic UNIMPLEMENTED
    before = stack.native_answers()
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)),
                        headers={"authorization": f"Bearer {stack.api_key}"})
    try:
        for index in range(3):
            tensor = triton.InferInput("image", [1, 8, 8], "UINT8")
            tensor.set_data_from_numpy(IMAGES[index:index + 1])
            client.async_stream_infer("demo", [tensor], request_id=f"s{index}")
        wrong = triton.InferInput("image", [1, 4], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 4), np.uint8))
        client.async_stream_infer("demo", [wrong], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    for index, (result, error) in enumerate(got[:3]):
        assert error is None, error
        assert result.get_response().id == f"s{index}"  # type: ignore[attr-defined]
        np.testing.assert_allclose(result.as_numpy("probabilities"),  # type: ignore[attr-defined]
                                   _expected(IMAGES[index:index + 1]), rtol=1e-5)
    assert got[3][0] is None and "shape" in str(got[3][1]), got[3]
    assert stack.native_answers() == before + 4  # each request answered by the front
    # a stream whose key is wrong: each request refused in the service's words, in order
    client.start_stream(callback=lambda result, error: answers.put((result, error)),
                        headers={"authorization": "Bearer not-a-key"})
    try:
        for index in range(2):
            tensor = triton.InferInput("image", [1, 8, 8], "UINT8")
            tensor.set_data_from_numpy(IMAGES[index:index + 1])
            client.async_stream_infer("demo", [tensor], request_id=f"k{index}")
        refused = [answers.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
    assert [(result, "missing or invalid API key" in str(error))
            for result, error in refused] == [(None, True)] * 2, refused


def test_the_classification_extension_over_grpc(stack: Stack,
                                                client: triton.InferenceServerClient) -> None:
    headers = {"authorization": f"Bearer {stack.api_key}"}
    tensor = triton.InferInput("image", [2, 8, 8], "UINT8")
    tensor.set_data_from_numpy(IMAGES[:2])
    wanted = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer("demo", [tensor], outputs=[wanted], headers=headers)
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    expected = _expected(IMAGES[:2])
    for row, scores in zip(classes, expected, strict=True):
        assert [int(item.decode().split(":")[1]) for item in row] == \
            list(np.argsort(-scores)[:3])
