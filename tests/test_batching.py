"""Batch assembly and per-item failure isolation (logic only: a stand-in engine function)."""

from __future__ import annotations

import numpy as np

from ppml_serve.errors import EngineError
from ppml_serve.worker.batching import Item, run_batched


class CountingModel:
    """Doubles its input; refuses any batch containing a negative value (a 'bad item')."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(int(x.shape[0]))
        if (x < 0).any():
            raise EngineError("bad value")
        return {"y": x * 2}


def items(*rows: list[float]) -> list[Item]:
    return [Item({"x": np.asarray(row, dtype=np.float32).reshape(-1, 1)}) for row in rows]


def test_items_share_one_call_and_get_their_own_rows() -> None:
    model = CountingModel()
    batch = items([1], [2, 3], [4])
    run_batched(batch, model, max_rows=16)
    assert model.calls == [4]
    assert [item.outputs["y"].ravel().tolist() for item in batch] == [[2], [4, 6], [8]]
    assert all(item.batch_size == 3 for item in batch)


def test_one_bad_item_does_not_fail_its_batch_mates() -> None:
    model = CountingModel()
    batch = items([1], [-1], [3])
    run_batched(batch, model, max_rows=16)
    assert isinstance(batch[1].error, EngineError) and batch[1].outputs is None
    assert batch[0].outputs["y"].item() == 2 and batch[2].outputs["y"].item() == 6


def test_different_shapes_are_not_mixed_and_max_rows_is_kept() -> None:
    model = CountingModel()
    wide = Item({"x": np.ones((1, 3), np.float32)})
    batch = [*items([1], [2], [3]), wide]
    run_batched(batch, model, max_rows=2)
    assert sorted(model.calls) == [1, 1, 2]
    assert wide.outputs["y"].shape == (1, 3)
