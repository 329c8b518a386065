"""Engines and INT8 quantization on the demo model (real ONNX Runtime and OpenVINO)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppml_serve.crypto.model_file import MAGIC
from ppml_serve.engines import load_engine
from ppml_serve.engines.base import resolve_engine
from ppml_serve.errors import EngineError
from ppml_serve.models import demo_model_path, demo_samples

IMAGES, LABELS = demo_samples()
MODELS = demo_model_path().parent


def test_openvino_matches_onnxruntime_in_fp32() -> None:
    data = demo_model_path().read_bytes()
    reference = load_engine("demo", data, "onnxruntime").infer({"image": IMAGES[:32]})
    openvino = load_engine("demo", data, "openvino", threads=1, precision="fp32")
    assert openvino.spec.inputs == load_engine("demo", data).spec.inputs
    got = openvino.infer({"image": IMAGES[:32]})
    np.testing.assert_allclose(got["probabilities"], reference["probabilities"], atol=1e-5)


def test_openvino_bf16_is_a_named_choice_and_close() -> None:
    engine = load_engine("demo", demo_model_path().read_bytes(), "openvino", precision="bf16")
    assert engine.precision == "bf16"  # type: ignore[attr-defined]
    predicted = engine.infer({"image": IMAGES})["probabilities"].argmax(axis=1)
    assert (predicted == LABELS).mean() > 0.97


def test_precision_and_engine_errors() -> None:
    data = demo_model_path().read_bytes()
    with pytest.raises(EngineError, match=r"fp32 there .bf16: engine openvino"):
        load_engine("demo", data, "onnxruntime", precision="bf16")
    with pytest.raises(EngineError, match="unknown engine"):
        load_engine("demo", data, "tensorrt")
    with pytest.raises(EngineError, match="could not be loaded"):
        load_engine("demo", b"not an onnx model", "onnxruntime")
    assert resolve_engine("onnxruntime") == "onnxruntime"
    assert resolve_engine("auto") in ("onnxruntime", "openvino")


def test_shipped_int8_demo_model_keeps_accuracy() -> None:
    fp32 = load_engine("fp32", demo_model_path().read_bytes())
    int8_bytes = (MODELS / "demo-int8.onnx").read_bytes()
    assert b"QuantizeLinear" in int8_bytes
    int8 = load_engine("int8", int8_bytes)
    accuracy = {name: (engine.infer({"image": IMAGES})["probabilities"].argmax(axis=1)
                       == LABELS).mean() for name, engine in (("fp32", fp32), ("int8", int8))}
    assert accuracy["int8"] >= accuracy["fp32"] - 0.01
    metrics = json.loads((MODELS / "demo.json").read_text())
    assert abs(metrics["test_accuracy"] - accuracy["fp32"]) < 1e-3


def _ppml(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ppml_serve", *args], capture_output=True,
                          text=True, timeout=180, env=env, check=False)


def test_quantize_cli_reports_agreement_and_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    done = _ppml("model", "quantize", str(demo_model_path()), str(out), "--calibration",
                 str(MODELS / "demo-calibration.npy"), "--eval", str(MODELS / "demo-samples.npz"),
                 "--limit", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["calibration_samples"] == 100 and report["heldout_samples"] == len(LABELS)
    assert report["top1_agreement"] >= 0.97
    assert report["int8_accuracy"] >= report["fp32_accuracy"] - 0.02
    assert "calibrating" in done.stderr  # the progress bar
    assert b"QuantizeLinear" in out.read_bytes()


def test_quantize_encrypted_model_stays_encrypted(tmp_path: Path) -> None:
    env = dict(os.environ, PPML_KMS_PASSPHRASE="quantize test")
    state = tmp_path / "state"
    assert _ppml("init", "--state-dir", str(state), env=env).returncode == 0
    encrypted, out = tmp_path / "demo.enc", tmp_path / "demo-int8.enc"
    assert _ppml("model", "encrypt", str(demo_model_path()), str(encrypted), "--state-dir",
                 str(state), env=env).returncode == 0
    done = _ppml("model", "quantize", str(encrypted), str(out), "--calibration",
                 str(MODELS / "demo-calibration.npy"), "--limit", "64", "--state-dir",
                 str(state), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["encrypted"] is True
    assert out.read_bytes().startswith(MAGIC) and b"QuantizeLinear" not in out.read_bytes()
    assert not [p for p in Path("/dev/shm").glob("ppml-quantize-*")], "scratch left behind"
    restored = tmp_path / "restored.onnx"
    assert _ppml("model", "decrypt", str(out), str(restored), "--state-dir", str(state),
                 env=env).returncode == 0
    assert b"QuantizeLinear" in restored.read_bytes()


def test_quantize_bad_calibration_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "calib.txt"
    bad.write_text("nope")
    done = _ppml("model", "quantize", str(demo_model_path()), str(tmp_path / "o.onnx"),
                 "--calibration", str(bad))
    assert done.returncode == 2 and "expected a .npy or .npz file" in done.stderr


def test_int8_model_served_by_openvino_worker(tmp_path: Path) -> None:
    from ppml_serve.client import Client
    from ppml_serve.local_stack import LocalStack
    from ppml_serve.settings import load_settings
    from ppml_serve.state import read_api_key

    int8_path = MODELS / "demo-int8.onnx"
    settings = load_settings(state_dir=tmp_path / "state", models={"digits-int8": int8_path},
                             gateway={"port": 0},
                             worker={"engine": "openvino", "engine_threads": 1, "streams": 2})
    stack = LocalStack(settings, workers=1, log_level="WARNING")
    try:
        stack.start()
        with Client(stack.url, api_key=read_api_key(settings.state_dir),
                    ca_file=settings.ca_file) as client:
            got = client.infer("digits-int8", IMAGES[:64])["probabilities"]
            platform = client.metadata("digits-int8")["platform"]
    finally:
        stack.stop()
    expected = load_engine("x", int8_path.read_bytes(), "openvino").infer(
        {"image": IMAGES[:64]})["probabilities"]
    assert platform == "openvino"
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_gateway_can_require_client_certificates(tmp_path: Path) -> None:
    import httpx

    from ppml_serve.client import Client
    from ppml_serve.local_stack import LocalStack
    from ppml_serve.settings import load_settings
    from ppml_serve.state import read_api_key

    state = tmp_path / "state"
    settings = load_settings(state_dir=state, models={"demo": demo_model_path()},
                             gateway={"port": 0, "client_ca_file": str(state / "ca.pem")},
                             worker={"engine_threads": 1})
    stack = LocalStack(settings, workers=1, log_level="WARNING")
    try:
        stack.start()
        api_key = read_api_key(state)
        with Client(stack.url, api_key=api_key, ca_file=settings.ca_file,
                    client_cert=stack.client_cert) as client:
            assert client.infer("demo", IMAGES[:2])["probabilities"].shape == (2, 10)
        with Client(stack.url, api_key=api_key, ca_file=settings.ca_file) as client, \
                pytest.raises(httpx.HTTPError):
            client.infer("demo", IMAGES[:2])
        # the gRPC port (the same front) asks for one too
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        assert stack.client_cert is not None
        cert, key = (path.read_bytes() for path in stack.client_cert)
        request = pb.ModelInferRequest(model_name="demo")
        request.inputs.add(name="image", datatype="UINT8", shape=[2, 8, 8])
        request.raw_input_contents.append(IMAGES[:2].tobytes())
        metadata = (("authorization", f"Bearer {api_key}"),)
        for chain in ((key, cert), None):
            credentials = grpc.ssl_channel_credentials(
                settings.ca_file.read_bytes(), *(chain or (None, None)))
            with grpc.secure_channel(stack.grpc_address, credentials) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                if chain is not None:
                    answer = stub.ModelInfer(request, metadata=metadata, timeout=10)
                    assert list(answer.outputs[0].shape) == [2, 10]
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.ModelInfer(request, metadata=metadata, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop()


def test_onnx_runtime_threads_sleep_when_idle_unless_asked_to_spin() -> None:
    # Spinning pool threads burned 1.7 ms of CPU per request that the gateway and Redis
    # needed on the same cores (null-model benchmark).
    data = demo_model_path().read_bytes()

    def spinning(engine: object) -> bool:
        options = engine._session.get_session_options()  # type: ignore[attr-defined]
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # not set: ONNX Runtime's default is to spin
            return True

    assert not spinning(load_engine("demo", data, threads=1))
    assert spinning(load_engine("demo", data, threads=1, spin_wait=True))


def test_allocator_thresholds_are_raised_unless_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ppml_serve.memory import tune_allocator

    assert tune_allocator() is True  # glibc here
    monkeypatch.setenv("PPML_ALLOCATOR", "default")
    assert tune_allocator() is False


def test_a_zipmap_output_is_refused_with_the_skl2onnx_option_that_avoids_it() -> None:
    # found: skl2onnx's default ZipMap output was refused without saying how to avoid it
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ZipMap", ["scores"], ["label_probabilities"],
                          classlabels_int64s=[0, 1], domain="ai.onnx.ml")],
        "zipmap", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 2])],
        [helper.make_value_info("label_probabilities", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                TensorProto.FLOAT, []))))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    with pytest.raises(EngineError, match=r"ZipMap.*'zipmap': False"):
        load_engine("classifier", model.SerializeToString())


def test_quantizing_a_scikit_learn_model_says_in_one_sentence_why_not(tmp_path: Path) -> None:
    # found: 'model quantize' on a scikit-learn ONNX model ended in a 22-line traceback
    from onnx import TensorProto, helper, save_model

    graph = helper.make_graph(
        [helper.make_node("LinearClassifier", ["x"], ["label", "probabilities"],
                          domain="ai.onnx.ml", classlabels_ints=[0, 1],
                          coefficients=[0.5, -0.5, -0.5, 0.5], intercepts=[0.0, 0.0],
                          post_transform="SOFTMAX")],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    source = tmp_path / "linear.onnx"
    save_model(model, str(source))
    samples = tmp_path / "x.npy"
    np.save(samples, np.random.default_rng(0).random((8, 2), dtype=np.float32))
    done = _ppml("model", "quantize", str(source), str(tmp_path / "int8.onnx"),
                 "--calibration", str(samples))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "ONNX-ML operators (LinearClassifier)" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
