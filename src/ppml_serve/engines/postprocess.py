"""Post-processing inside the worker, so only the small answer leaves the trusted side."""

from __future__ import annotations

from typing import Any

import numpy as np

from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.engines.base import Engine
from ppml_serve.errors import ConfigError

_FLOATS = ("FP16", "FP32", "FP64")


class TopK:
    """An engine that adds the ``k`` best classes of one score output (``[batch, classes]``)
    as ``OUTPUT_topk_indices`` (INT64) and ``OUTPUT_topk_scores``, best first."""

    def __init__(self, engine: Engine, k: int, output: str | None = None) -> None:
        spec = engine.spec
        source = next((t for t in spec.outputs if output in (None, t.name)), None)
        if source is None:
            raise ConfigError(f"top_k_output: model {spec.name!r} has no output {output!r}")
        if source.datatype not in _FLOATS or len(source.shape) != 2:
            others = ", ".join(t.name for t in spec.outputs if t.name != source.name)
            raise ConfigError(
                f"top_k: output {source.name!r} must be float scores shaped [batch, classes], "
                f"not {source.datatype} {list(source.shape)}"
                + (f"; name the scores output with top_k_output (outputs: {others})"
                   if others and output is None else ""))
        if source.shape[1] > 0 and k > source.shape[1]:
            raise ConfigError(f"top_k: {k} is more than the {source.shape[1]} classes")
        self._engine, self._k, self._source = engine, k, source.name
        self._indices, self._scores = f"{source.name}_topk_indices", f"{source.name}_topk_scores"
        self._spec = ModelSpec(spec.name, spec.inputs, (
            *spec.outputs, TensorSpec(self._indices, "INT64", (-1, k)),
            TensorSpec(self._scores, source.datatype, (-1, k))), spec.platform)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def infer(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        outputs = self._engine.infer(inputs)
        scores = outputs[self._source]
        best = np.argsort(-scores, axis=1, kind="stable")[:, : self._k]
        outputs[self._indices] = best.astype(np.int64)
        outputs[self._scores] = np.take_along_axis(scores, best, axis=1)
        return outputs
