"""A worker's intake of one micro-batch: its request records opened in one native call (the
GIL released), and the rows of those that fit the model's inputs stacked into one buffer per
input, so that the engine's batch is a slice of it, not a copy of each request.

A record that opens but does not fit (other shapes, no rows or too many, an input the model
lacks) comes back as its plaintext for the worker's own checks, which word the error; one
sealed end to end by the client, or whose payload is missing, is not taken here at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ppml_serve._native import BatchLayout
from ppml_serve.codecs.tensors import ModelSpec, numpy_dtype
from ppml_serve.crypto.envelope import REQUEST, Sealer, associated_data
from ppml_serve.queue.contract import Delivery, Mode
from ppml_serve.worker.batching import Item, Stacked

Fate = Item | Exception | bytes | None
"""What the intake made of a delivery: its ``Item`` (rows stacked), the error that refused
it, its opened record that did not fit (``bytes``), or ``None``: not taken."""


class BatchIntake:
    """Opens a model version's batches; ``model`` is its queue name (what records bind)."""

    def __init__(self, model: str, spec: ModelSpec, sealer: Sealer, max_rows: int) -> None:
        self._model = model
        self._sealer = sealer
        self._max_rows = max_rows
        self._layout = BatchLayout.of(
            [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in spec.inputs])
        self._columns = [] if self._layout is None else [
            (name, numpy_dtype(datatype), tuple(tail))
            for name, datatype, tail in self._layout.columns()]

    @property
    def stacks(self) -> bool:
        """Whether the model's inputs can be stacked at all (fixed sizes past the first)."""
        return self._layout is not None

    def open(self, deliveries: list[Delivery]) -> list[Fate]:
        """One fate per delivery, in order."""
        fates: list[Fate] = [None] * len(deliveries)
        taken = [index for index, delivery in enumerate(deliveries)
                 if delivery.mode is Mode.STANDARD and delivery.body]
        if self._layout is None or not taken:
            return fates
        records = [deliveries[index].body for index in taken]
        aads = [associated_data(self._model, deliveries[index].request_id, REQUEST)
                for index in taken]
        buffers, rows, opened = self._sealer.open_batch(records, aads, self._layout,
                                                        self._max_rows)
        columns: dict[str, np.ndarray[Any, Any]] = {
            name: np.frombuffer(buffer, dtype=dtype).reshape((rows, *tail))
            for (name, dtype, tail), buffer in zip(self._columns, buffers, strict=True)}
        for index, fate in zip(taken, opened, strict=True):
            if fate[0] == "stacked":
                start, stop = int(fate[1]), int(fate[1]) + int(fate[2])
                fates[index] = Item({name: column[start:stop] for name, column in columns.items()},
                                    stacked=Stacked(columns, start, stop))
            elif isinstance(fate[1], Exception | bytes):  # refused: its error; unfit: itself
                fates[index] = fate[1]
        return fates
