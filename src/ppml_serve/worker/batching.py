"""Run many requests as few engine calls, isolating failures to the item that caused them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppml_serve.errors import EngineError, InvalidInput

Tensors = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Stacked:
    """Where an item's rows lie in columns shared with its batch-mates (``BatchIntake``):
    rows ``start:stop`` of each column."""

    columns: Tensors
    start: int
    stop: int


@dataclass
class Item:
    """One request's inputs and, after ``run_batched``, its outputs or error."""

    inputs: Tensors
    outputs: Tensors | None = None
    error: Exception | None = None
    batch_size: int = field(default=1)
    stacked: Stacked | None = None
    """Set when ``inputs`` are rows of stacked columns: adjacent items then share one
    engine call without a copy."""

    @property
    def rows(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0]) if first.ndim else 1


def _signature(inputs: Tensors) -> tuple[Any, ...]:
    # Items can share an engine call only if every input agrees beyond the batch dimension.
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


def run_batched(items: list[Item], infer: Callable[[Tensors], Tensors],
                max_rows: int) -> None:
    """Fill each item's ``outputs`` or ``error``; never raises for one item's fault."""
    groups: dict[tuple[Any, ...], list[Item]] = defaultdict(list)
    for item in items:
        if any(array.ndim == 0 for array in item.inputs.values()):
            _run_alone(item, infer)
        else:
            groups[_signature(item.inputs)].append(item)
    for group in groups.values():
        chunk: list[Item] = []
        rows = 0
        for item in group:
            if chunk and rows + item.rows > max_rows:
                _run_chunk(chunk, infer)
                chunk, rows = [], 0
            chunk.append(item)
            rows += item.rows
        if chunk:
            _run_chunk(chunk, infer)


def _adjacent(chunk: list[Item]) -> Tensors | None:
    """The chunk's inputs as one slice of the columns they were stacked in, when its items
    lie there one after the other (else ``None``: they must be concatenated)."""
    first = chunk[0].stacked
    if first is None:
        return None
    stop = first.stop
    for item in chunk[1:]:
        if item.stacked is None or item.stacked.columns is not first.columns \
                or item.stacked.start != stop:
            return None
        stop = item.stacked.stop
    return {name: column[first.start:stop] for name, column in first.columns.items()}


def _run_alone(item: Item, infer: Callable[[Tensors], Tensors]) -> None:
    try:
        item.outputs = infer(item.inputs)
        item.batch_size = 1
    except (EngineError, InvalidInput) as exc:  # the engine refused this item's data
        item.error = exc


def _run_chunk(chunk: list[Item], infer: Callable[[Tensors], Tensors]) -> None:
    if len(chunk) == 1:
        _run_alone(chunk[0], infer)
        return
    names = list(chunk[0].inputs)
    joined = _adjacent(chunk) or {
        name: np.concatenate([item.inputs[name] for item in chunk]) for name in names}
    try:
        outputs = infer(joined)
    except (EngineError, InvalidInput):
        # One bad item must not fail its batch-mates: retry each on its own.
        for item in chunk:
            _run_alone(item, infer)
        return
    total = sum(item.rows for item in chunk)
    if any(array.ndim == 0 or array.shape[0] != total for array in outputs.values()):
        for item in chunk:  # the model does not keep the batch dimension: no batching
            _run_alone(item, infer)
        return
    start = 0
    for item in chunk:
        stop = start + item.rows
        item.outputs = {name: array[start:stop] for name, array in outputs.items()}
        item.batch_size = len(chunk)
        start = stop
