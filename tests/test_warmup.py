"""Model warm-up (config.yaml ``warmup``): the batches it builds from a model's declared
inputs, and that running them goes through the engine and fails the load in words."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.engines import load_engine
from ppml_serve.errors import ConfigError, EngineError
from ppml_serve.models import demo_model_path
from ppml_serve.repository.config import ModelConfig, Warmup
from ppml_serve.worker.warmup import run_warmup, warmup_inputs

RNG = np.random.default_rng(0)


def test_batches_follow_the_declared_inputs() -> None:
    spec = (TensorSpec("image", "UINT8", (-1, 8, 8)), TensorSpec("text", "BYTES", (-1,)),
            TensorSpec("tokens", "INT64", (-1, -1)))
    inputs = warmup_inputs(spec, Warmup(batch_size=4, shapes={"tokens": [-1, 16]}), RNG)
    assert inputs["image"].shape == (4, 8, 8) and not inputs["image"].any()
    assert inputs["text"].tolist() == [b""] * 4
    assert inputs["tokens"].shape == (4, 16) and inputs["tokens"].dtype == np.int64
    ModelSpec("m", spec, ()).check_inputs(inputs)  # what a request would have to pass
    noisy = warmup_inputs(spec[:2], Warmup(batch_size=2, data="random"), RNG)
    assert noisy["image"].any() and all(noisy["text"])


@pytest.mark.parametrize(("warmup", "message"), [
    (Warmup(), "has dynamic dimensions [-1, -1]; give its shape in warmup.shapes"),
    (Warmup(shapes={"tokens": [-1]}), "has 1 dimensions, the model's input [-1, -1] has 2"),
    (Warmup(shapes={"nope": [1]}), "['nope'] are not inputs of the model"),
])
def test_shapes_it_cannot_build_are_refused_in_words(warmup: Warmup, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        warmup_inputs((TensorSpec("tokens", "INT64", (-1, -1)),), warmup, RNG)
    assert message in str(refused.value)


def test_the_engine_runs_each_batch_and_a_failure_names_the_model() -> None:
    engine = load_engine("demo", demo_model_path().read_bytes())
    calls: list[dict[str, Any]] = []

    class Counting:
        spec = engine.spec

        def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
            calls.append(inputs)
            return engine.infer(inputs)

    assert run_warmup(Counting(), Warmup(batch_size=5, runs=3), "model 'demo'") > 0
    assert len(calls) == 3 and calls[0]["image"].shape == (5, 8, 8)

    class Failing(Counting):
        def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
            raise EngineError("model 'demo' failed: Fail")

    with pytest.raises(ConfigError, match="model 'demo' version 1: warm-up failed"):
        run_warmup(Failing(), Warmup(), "model 'demo' version 1")


def test_warmup_is_validated_and_left_out_of_the_measurement() -> None:
    config = ModelConfig.model_validate({"warmup": {"batch_size": 2, "data": "random"}})
    assert config.warmup == Warmup(batch_size=2, data="random")
    assert "warmup" not in config.measured()  # warming does not change what is computed
    with pytest.raises(ValueError, match="zeros"):
        ModelConfig.model_validate({"warmup": {"data": "ones"}})
