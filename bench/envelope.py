"""Seal + open of one record: the native envelope (ppml-core, aws-lc) against the Python
implementation it replaced (``cryptography``'s AESGCM, OpenSSL), interleaved in one run.

    python bench/envelope.py --sizes 64,153600,602112 --rounds 7 --out bench/results

Prints and writes envelope.json: per size, the median over rounds of microseconds per
seal + open, and the ratio new / old (below 1: the native one is cheaper).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml_serve.crypto.envelope import Keyring
from ppml_serve.memory import tune_allocator

KEY = os.urandom(32)
AAD = json.dumps(["ppml-serve/1", "model", "0123456789abcdef0123456789abcdef", "request"]).encode()


def _old(plaintext: bytes) -> None:
    """The Python Keyring as it was: header, AESGCM.encrypt, then decrypt over a view."""
    cipher = AESGCM(KEY)
    nonce = os.urandom(12)
    header = b"PE\x01\x01k" + nonce
    record = header + cipher.encrypt(nonce, plaintext, header + AAD)
    view = memoryview(record)
    cipher.decrypt(view[5:17], view[17:], bytes(view[:17]) + AAD)


def _new(ring: Keyring) -> Callable[[bytes], None]:
    def run(plaintext: bytes) -> None:
        ring.open(ring.seal(plaintext, AAD), AAD)
    return run


def _time(run: Callable[[bytes], None], plaintext: bytes, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        run(plaintext)
    return (time.perf_counter() - started) / repeat * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,153600,602112", help="plaintext bytes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    tune_allocator()  # as every gateway and worker process does (ppml_serve.memory)
    new = _new(Keyring({"k": KEY}, "k"))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        plaintext = os.urandom(size)
        repeat = max(20, min(20_000, 50_000_000 // max(size, 1) // 10))
        old_us, new_us = [], []
        for _ in range(args.rounds):  # interleaved: both see the same machine
            old_us.append(_time(_old, plaintext, repeat))
            new_us.append(_time(new, plaintext, repeat))
        row = {"bytes": size, "old_us": round(statistics.median(old_us), 2),
               "new_us": round(statistics.median(new_us), 2),
               "ratio_new_old": round(statistics.median(n / o for n, o in
                                                        zip(new_us, old_us, strict=True)), 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "envelope.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
