"""What a refusal costs the gateway (the native front answers them): the demo model with its
last worker stopped (``--case no-worker``: every request gets 503 "no live worker"), or
calls without an API key (``--case no-key``: 401).

    python bench/refusals.py --case no-worker --runs 3 --duration 5 \
        --json bench/results/refusals-no-worker.json

A local stack (TLS Redis, the gateway, one worker, stopped with SIGTERM once its spec is
published for ``no-worker``), loaded by keep-alive HTTPS clients at concurrency 32 that
send again as soon as an answer returns. (Until the Python request path was removed, each
run alternated with it: ``bench/results/refusals-*.json`` hold both.) Reported per run and
as medians: refusals a second, p50, and the gateway's CPU per refusal. Clients that retry at
once against a model with no worker, or a flood of calls without a key, are the loads this
measures: what the gateway spends saying no decides what it has left for everyone else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from ppml_serve.bench.cpu import part_pids, per_request_ms, snapshot
from ppml_serve.bench.load import build_request
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.settings import load_settings
from ppml_serve.state import read_api_key

CONCURRENCY = 32


async def _load(url: str, request: bytes, duration_s: float,
                context: ssl.SSLContext) -> tuple[list[int], list[float]]:
    """``CONCURRENCY`` keep-alive connections sending ``request`` back to back for
    ``duration_s``: every answer's status and latency (ms)."""
    parts = urlsplit(url)
    statuses: list[int] = []
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def loop() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port,
                                                       ssl=context)
        try:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line[15:]) for line in head.split(b"\r\n")
                               if line[:15].lower() == b"content-length:"), 0)
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - sent) * 1000)
                statuses.append(int(head[9:12]))
        finally:
            writer.close()

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    return statuses, latencies


def measure(case: str, duration_s: float, state: Path) -> dict[str, Any]:
    settings = load_settings(state_dir=state, models={"demo": demo_model_path()},
                             gateway={"port": 0}, worker={"heartbeat_s": 0.3})
    stack = LocalStack(settings, workers=1, log_level="WARNING")
    stack.start()
    try:
        key = read_api_key(settings.state_dir)
        images, _ = demo_samples()
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                       "shape": [1, 8, 8],
                                       "data": images[0].ravel().tolist()}]}).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        expected, words = 503, "no live worker"
        if case == "no-key":
            headers, expected, words = {"Content-Type": "application/json"}, 401, "API key"
        for worker in (c for c in stack.children
                       if c.name.startswith("worker") and case == "no-worker"):
            if worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)  # leaves the group: no live worker
                worker.process.wait(10)
        with httpx.Client(base_url=stack.url, verify=str(settings.ca_file),
                          headers=headers) as http:
            for _ in range(100):  # until the stop is seen
                answer = http.post("/v2/models/demo/infer", content=body)
                if answer.status_code == expected:
                    break
            if answer.status_code != expected or words not in answer.text:
                raise SystemExit(f"expected {expected} ({words}), got {answer.status_code}: "
                                 f"{answer.text}")
        context = ssl.create_default_context(cafile=str(settings.ca_file))
        request = build_request(stack.url, "/v2/models/demo/infer", body, headers)
        pids = part_pids(stack)
        pids["worker"] = []
        asyncio.run(_load(stack.url, request, 1.0, context))  # warm up
        before = snapshot(pids)
        statuses, latencies = asyncio.run(_load(stack.url, request, duration_s, context))
        after = snapshot(pids)
        if set(statuses) != {expected}:
            raise SystemExit(f"expected only {expected}s, got {sorted(set(statuses))}")
        cpu = per_request_ms(before, after, len(statuses))
        return {"case": case,
                "refusals_per_s": round(len(statuses) / duration_s, 1),
                "p50_ms": round(statistics.median(latencies), 3),
                "gateway_cpu_ms": cpu["gateway"], "front_cpu_ms": cpu["front"],
                "redis_cpu_ms": cpu["redis"]}
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("no-worker", "no-key"), default="no-worker",
                        help="what is refused: a model without a live worker (503), or "
                             "calls without an API key (401)")
    parser.add_argument("--runs", type=int, default=3, help="runs (each on a fresh stack)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args()
    if args.runs < 1 or args.duration <= 0:
        parser.error("--runs must be at least 1 and --duration positive")
    runs: list[dict[str, Any]] = []
    for index in tqdm(range(args.runs), desc="runs", unit="run"):
        with tempfile.TemporaryDirectory(prefix="ppml-refusals-") as state:
            runs.append({"run": index, **measure(args.case, args.duration, Path(state))})
    summary = {figure: statistics.median(run[figure] for run in runs)
               for figure in ("refusals_per_s", "p50_ms", "gateway_cpu_ms", "front_cpu_ms",
                              "redis_cpu_ms")}
    report = {"case": args.case, "concurrency": CONCURRENCY, "duration_s": args.duration,
              "runs": runs, "median": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
