"""GPU engines (ONNX Runtime CUDA and TensorRT): provider choice, configuration and every
error, tested on the CPU build; the I/O-binding run path tested on the CPU; the GPU runs
themselves (marked ``gpu``) only where ONNX Runtime's GPU build and a GPU are present —
bench/gpu_check.sh runs them on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from ppml_serve.engines import load_engine
from ppml_serve.engines.onnxruntime_engine import OnnxRuntimeEngine
from ppml_serve.engines.providers import (
    CPU,
    CUDA,
    TENSORRT,
    ProviderChoice,
    check_used,
    choose_providers,
)
from ppml_serve.errors import ConfigError, EngineError
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.repository.config import ModelConfig
from ppml_serve.settings import WorkerSettings, load_settings

IMAGES, _ = demo_samples()
GPU_BUILD = [CPU, CUDA, TENSORRT]


def test_the_cpu_is_the_default_and_stays_on_its_provider() -> None:
    assert choose_providers("cpu", "auto", "fp32", [CPU]) == ProviderChoice([CPU])
    assert WorkerSettings().device == "cpu" and WorkerSettings().execution_provider == "auto"


def test_auto_on_a_gpu_takes_tensorrt_when_there_else_cuda() -> None:
    trt = choose_providers("cuda:1", "auto", "fp16", GPU_BUILD)
    assert trt.wanted == TENSORRT and trt.device_type == "cuda" and trt.device_id == 1
    assert trt.label == "TensorRT fp16 on cuda:1"
    name, options = trt.providers[0]  # type: ignore[misc]
    assert name == TENSORRT and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is False, "no plaintext engine on disk"
    assert [p[0] if isinstance(p, tuple) else p for p in trt.providers] == [TENSORRT, CUDA, CPU]
    cuda = choose_providers("cuda", "auto", "fp32", [CPU, CUDA])
    assert cuda.wanted == CUDA and cuda.providers == [(CUDA, {"device_id": 0}), CPU]
    int8 = choose_providers("cuda", "tensorrt", "int8", GPU_BUILD)
    assert int8.options["trt_int8_enable"] is True and int8.options["trt_fp16_enable"] is False


@pytest.mark.parametrize(("device", "provider", "precision", "available", "message"), [
    ("cuda", "auto", "fp32", [CPU], "no GPU provider.*pip install 'ppml-serve\\[gpu\\]'"),
    ("cuda", "tensorrt", "fp32", [CPU, CUDA], "lacks TensorrtExecutionProvider"),
    ("cuda", "cuda", "fp16", GPU_BUILD, "fp16 and int8 are built by TensorRT"),
    ("cuda", "auto", "bf16", GPU_BUILD, "bf16 is OpenVINO's"),
    ("cpu", "tensorrt", "fp32", [CPU], "runs on a GPU: set device to cuda"),
    ("cpu", "auto", "fp16", [CPU], "fp32 there"),
    ("cuda", "cpu", "fp32", GPU_BUILD, "set device to cpu"),
    ("gpu", "auto", "fp32", GPU_BUILD, "expected cpu, cuda or cuda:N"),
])
def test_each_impossible_ask_says_what_to_change(device: str, provider: str, precision: str,
                                                 available: list[str], message: str) -> None:
    with pytest.raises(EngineError, match=message):
        choose_providers(device, provider, precision, available)


def test_a_silent_fallback_to_the_cpu_is_refused() -> None:
    """ONNX Runtime starts on the CPU alone when CUDA cannot start: that must fail the load."""
    choice = choose_providers("cuda", "auto", "fp32", [CPU, CUDA])
    with pytest.raises(EngineError, match=r"could not start CUDAExecutionProvider.*runs on "
                                          r"CPUExecutionProvider"):
        check_used(choice, [CPU])
    check_used(choice, [CUDA, CPU])


def test_a_gpu_asked_of_this_machine_fails_the_load_in_words() -> None:
    """The real ONNX Runtime of this machine (a CPU build)."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(EngineError, match="no GPU provider"):
        load_engine("demo", demo_model_path().read_bytes(), device="cuda")
    with pytest.raises(EngineError, match="served by engine onnxruntime"):
        load_engine("demo", demo_model_path().read_bytes(), "openvino", device="cuda")


def test_settings_and_config_yaml_validate_the_choice() -> None:
    assert load_settings(worker={"device": "cuda:3"}).worker.device == "cuda:3"
    with pytest.raises(ConfigError, match=r"worker\.device"):
        load_settings(worker={"device": "gpu0"})
    config = ModelConfig.model_validate({"device": "cuda", "execution_provider": "tensorrt",
                                         "precision": "fp16"})
    chosen = config.worker_settings(WorkerSettings())
    assert (chosen.device, chosen.execution_provider, chosen.precision) == \
        ("cuda", "tensorrt", "fp16")
    assert config.measured()["device"] == "cuda", "where a model runs is part of the measure"


def test_the_io_binding_path_answers_as_the_plain_run() -> None:
    """The GPU path's run (inputs bound once, outputs copied back once), on the CPU device."""
    engine = load_engine("demo", demo_model_path().read_bytes())
    assert isinstance(engine, OnnxRuntimeEngine)
    (bound,) = engine.run_bound({"image": IMAGES[:16]}, "cpu", 0)
    np.testing.assert_array_equal(bound, engine.infer({"image": IMAGES[:16]})["probabilities"])


gpu = pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                         reason="needs ONNX Runtime's GPU build and an NVIDIA GPU "
                                "(bench/gpu_check.sh runs these on a lent GPU machine)")


@gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_the_demo_model_on_the_gpu_answers_as_on_the_cpu(provider: str) -> None:
    if provider == "tensorrt" and TENSORRT not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no TensorRT")
    cpu = load_engine("demo", demo_model_path().read_bytes()).infer({"image": IMAGES})
    engine = load_engine("demo", demo_model_path().read_bytes(), device="cuda",
                         execution_provider=provider)
    got = engine.infer({"image": IMAGES})
    np.testing.assert_allclose(got["probabilities"], cpu["probabilities"], atol=1e-4)


def test_the_benchmark_reports_host_cores_per_1000_requests_and_gpu_use() -> None:
    from ppml_serve.bench.gpu import GpuSampler, cores_per_1000_rps

    # 1 ms of CPU per request across the parts keeps one core busy at 1,000 req/s
    assert cores_per_1000_rps({"gateway": 0.5, "redis": 0.1, "worker": 0.4,
                               "front": 0.3}) == 1.0  # front is a share of gateway
    assert cores_per_1000_rps({}) is None
    sampler = GpuSampler(0, interval_s=0.01).start()
    utilization = sampler.stop()
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver here: nothing to read, nothing invented
        assert utilization is None


def test_a_model_tensorrt_cannot_build_fails_its_load_in_words(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime raises when TensorRT cannot build an engine (a stand-in here for what only
    a GPU machine can show): the load fails naming the provider, no traceback."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("TensorRT EP failed to create engine from network")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    choice = choose_providers("cuda", "tensorrt", "fp16", GPU_BUILD)
    with pytest.raises(EngineError, match=r"could not be loaded by ONNX Runtime \(TensorRT "
                                          r"fp16 on cuda:0\): RuntimeError"):
        OnnxRuntimeEngine("demo", demo_model_path().read_bytes(), choice=choice)
