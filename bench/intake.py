"""A worker's intake of one micro-batch, one record at a time against the batch intake.

    python bench/intake.py --batch 16 --pairs 8 --json bench/results/intake.json

*one by one* is the worker's path before the batch intake (and still its path for records
that do not fit): open each record (a native call), frame its tensors, check them against the
model, then concatenate the batch for the engine. *batch* is ``worker.intake.BatchIntake``:
one native call opens every record and stacks the rows into one buffer per input, and the
engine's batch is a slice of it. Both end with the same ``run_batched`` and a stand-in engine
that returns at once, so what is timed is the intake alone, as CPU time of the calling thread
(the native call runs on it). The two alternate; the figure is the median of the paired ratios
(batch / one by one), what survives a noisy machine best.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import ModelSpec, TensorSpec
from ppml_serve.crypto.envelope import REQUEST, Keyring, associated_data
from ppml_serve.queue.contract import Delivery
from ppml_serve.worker.batching import Item, run_batched
from ppml_serve.worker.intake import BatchIntake

MODEL = "bench@1"
MAX_ROWS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="records per batch")
    parser.add_argument("--shape", default="224,224,3", help="one record's image shape (UINT8)")
    parser.add_argument("--pairs", type=int, default=8, help="alternating measurements")
    parser.add_argument("--rounds", type=int, default=100, help="batches per measurement")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    shape = tuple(int(d) for d in args.shape.split(","))
    spec = ModelSpec("bench", (TensorSpec("image", "UINT8", (-1, *shape)),),
                     (TensorSpec("out", "FP32", (-1,)),))
    ring = Keyring({"k1": os.urandom(32)}, "k1")
    rng = np.random.default_rng(0)
    deliveries = [
        Delivery(f"{i}-0", f"r{i}", "replies", ring.seal(
            record.pack({"image": rng.integers(0, 255, (1, *shape), dtype=np.uint8)}),
            associated_data(MODEL, f"r{i}", REQUEST)), 0)
        for i in range(args.batch)]

    def engine(inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        return {"out": np.zeros(len(inputs["image"]), np.float32)}

    def one_by_one() -> None:
        items = []
        for delivery in deliveries:
            opened = ring.open(delivery.body,
                               associated_data(MODEL, delivery.request_id, REQUEST))
            _, inputs = record.unpack(opened)
            spec.check_inputs(inputs, MAX_ROWS)
            items.append(Item(inputs))
        run_batched(items, engine, MAX_ROWS * args.batch)

    intake = BatchIntake(MODEL, spec, ring, MAX_ROWS)

    def batch() -> None:
        items = [fate for fate in intake.open(deliveries) if isinstance(fate, Item)]
        run_batched(items, engine, MAX_ROWS * args.batch)

    def per_record_us(run: Callable[[], None]) -> float:
        for _ in range(5):
            run()
        times = []
        for _ in range(args.rounds):
            started = time.thread_time()  # CPU time: a shared machine's preemption aside
            run()
            times.append(time.thread_time() - started)
        return statistics.median(times) / args.batch * 1e6

    figures: dict[str, list[float]] = {"one_by_one_us": [], "batch_us": []}
    for pair in range(args.pairs):
        order = [("one_by_one_us", one_by_one), ("batch_us", batch)]
        for name, run in order if pair % 2 == 0 else reversed(order):
            figures[name].append(per_record_us(run))
    ratios = [b / o for b, o in zip(figures["batch_us"], figures["one_by_one_us"], strict=True)]
    summary = {
        "record_bytes": int(np.prod(shape)), "batch": args.batch, "pairs": args.pairs,
        "one_by_one_us_per_record": round(statistics.median(figures["one_by_one_us"]), 1),
        "batch_us_per_record": round(statistics.median(figures["batch_us"]), 1),
        "paired_ratio_batch_over_one_by_one": round(statistics.median(ratios), 3),
        "runs": figures,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
