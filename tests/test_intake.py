"""A worker's batch intake (worker/intake.py over ppml-core's batch.rs): records opened in one
native call, rows stacked into one buffer per input that the engine's batch is a slice of,
and every record's fault kept to that record, worded as the one-by-one path words it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.crypto.envelope import REQUEST, Keyring, PlaintextSealer, Sealer, associated_data
from ppml_serve.errors import IntegrityError, ProtocolError
from ppml_serve.queue.contract import Delivery, Mode
from ppml_serve.worker.batching import Item, run_batched
from ppml_serve.worker.intake import BatchIntake

MODEL = "imgs@1"
SPEC = ModelSpec("imgs", (TensorSpec("image", "UINT8", (-1, 4, 3)),
                          TensorSpec("scale", "FP32", (-1,))),
                 (TensorSpec("out", "FP32", (-1,)),))


def _images(rows: int, fill: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"image": np.full((rows, 4, 3), fill, np.uint8),
            "scale": np.full((rows,), fill / 2, np.float32)}


def _delivery(sealer: Sealer, index: int, tensors: dict[str, np.ndarray[Any, Any]] | None = None,
              body: bytes | None = None, request_id: str | None = None,
              mode: Mode = Mode.STANDARD) -> Delivery:
    request_id = request_id or f"r{index}"
    if body is None:
        body = sealer.seal(record.pack(tensors or _images(1, index)),
                           associated_data(MODEL, request_id, REQUEST))
    return Delivery(f"{index}-0", f"r{index}", "replies", body, 0, mode=mode)


@pytest.fixture(params=["sealed", "plain"])
def sealer(request: pytest.FixtureRequest) -> Sealer:
    return Keyring({"k1": os.urandom(32)}, "k1") if request.param == "sealed" \
        else PlaintextSealer()


def test_rows_are_stacked_in_order_and_the_engine_gets_a_slice_not_a_copy(
        sealer: Sealer) -> None:
    intake = BatchIntake(MODEL, SPEC, sealer, max_rows=8)
    deliveries = [_delivery(sealer, 0, _images(1, 1)), _delivery(sealer, 1, _images(2, 2)),
                  _delivery(sealer, 2, _images(1, 3))]
    fates = intake.open(deliveries)
    assert all(isinstance(fate, Item) for fate in fates)
    items = [fate for fate in fates if isinstance(fate, Item)]
    for item, (rows, fill) in zip(items, [(1, 1), (2, 2), (1, 3)], strict=True):
        assert item.rows == rows
        np.testing.assert_array_equal(item.inputs["image"], _images(rows, fill)["image"])
        np.testing.assert_array_equal(item.inputs["scale"], _images(rows, fill)["scale"])
    seen: list[dict[str, np.ndarray[Any, Any]]] = []

    def engine(inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        seen.append(inputs)
        return {"out": inputs["image"].reshape(len(inputs["scale"]), -1).sum(axis=1)
                * inputs["scale"]}

    run_batched(items, engine, max_rows=64)
    assert len(seen) == 1 and seen[0]["image"].shape == (4, 4, 3)
    assert np.shares_memory(seen[0]["image"], items[0].inputs["image"])  # no concatenation
    assert [item.outputs["out"].tolist() for item in items if item.outputs] == [
        [12 * 1 * 0.5], [12 * 2 * 1.0] * 2, [12 * 3 * 1.5]]


def test_each_records_fault_stays_its_own(sealer: Sealer) -> None:
    intake = BatchIntake(MODEL, SPEC, sealer, max_rows=8)
    good = _delivery(sealer, 0)
    tampered_body = bytearray(_delivery(sealer, 1).body)
    tampered_body[-1] ^= 1
    wrong_shape = {"image": np.zeros((1, 3, 4), np.uint8), "scale": np.zeros(1, np.float32)}
    deliveries = [
        good,
        _delivery(sealer, 1, body=bytes(tampered_body)),
        _delivery(sealer, 2, request_id="another"),  # bound to another request
        _delivery(sealer, 3, body=sealer.seal(b"not a record",
                                              associated_data(MODEL, "r3", REQUEST))),
        _delivery(sealer, 4, wrong_shape),
        _delivery(sealer, 5, _images(9, 5)),  # more rows than a request may have
        _delivery(sealer, 6, mode=Mode.SEALED),  # sealed end to end: not taken here
        _delivery(sealer, 7, body=b""),  # payload missing from the spool: not taken here
        _delivery(sealer, 8),
    ]
    fates = intake.open(deliveries)
    assert isinstance(fates[0], Item) and isinstance(fates[8], Item)
    if isinstance(sealer, Keyring):
        assert isinstance(fates[1], IntegrityError) and isinstance(fates[2], IntegrityError)
        assert fates[8].stacked is not None and fates[8].stacked.start == 1
    else:  # no encryption: nothing authenticates a record
        assert isinstance(fates[1], Item) and isinstance(fates[2], Item)
        assert fates[8].stacked is not None and fates[8].stacked.start == 3
    assert isinstance(fates[3], ProtocolError)
    for unfit in (fates[4], fates[5]):  # handed back opened, for the worker's own checks
        assert isinstance(unfit, bytes)
    _, tensors = record.unpack(fates[4])  # type: ignore[arg-type]
    assert tensors["image"].shape == (1, 3, 4)
    assert fates[6] is None and fates[7] is None


def test_a_model_whose_rows_cannot_be_stacked_takes_nothing() -> None:
    sealer = Keyring({"k1": os.urandom(32)}, "k1")
    ragged = ModelSpec("t", (TensorSpec("tokens", "INT64", (-1, -1)),),
                       (TensorSpec("out", "FP32", (-1,)),))
    intake = BatchIntake(MODEL, ragged, sealer, max_rows=8)
    assert not intake.stacks
    tokens = {"tokens": np.zeros((1, 5), np.int64)}
    assert intake.open([_delivery(sealer, 0, tokens)]) == [None]
