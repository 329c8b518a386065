"""Scaling figures: throughput of the demo model with 1, 2 and 4 workers and 1 and 2 gateways,
and the CPU each part spends per request (from /proc), so that one can tell where one Redis,
one gateway and one worker saturate.

    python bench/scaling.py --out bench/results          # -> scaling.json, scaling.md

Every part runs on this machine: on a 2-core host the total is bounded by the two cores, and
the per-part CPU cost per request is the figure that carries over to bigger machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ppml_serve.bench.cpu import part_pids, per_request_ms, snapshot
from ppml_serve.bench.load import build_request, run_load
from ppml_serve.bench.runner import sample_inputs
from ppml_serve.client.http import encode_inputs
from ppml_serve.crypto.tls import client_context
from ppml_serve.engines import load_engine
from ppml_serve.local_stack import Child, LocalStack
from ppml_serve.models import DEMO_NAME, demo_model_path
from ppml_serve.queue.redis_server import free_port
from ppml_serve.settings import load_settings
from ppml_serve.state import read_api_key


def measure(workers: int, gateways: int, concurrency: int, duration_s: float,
            state: Path) -> dict[str, Any]:
    settings = load_settings(state_dir=state, models={DEMO_NAME: demo_model_path()},
                             gateway={"port": 0, "max_queue_length": 100_000},
                             worker={"engine_threads": 1})
    stack = LocalStack(settings, workers, log_level="ERROR")
    extra: list[Child] = []
    stack.start()
    try:
        urls = [stack.url]
        for index in range(1, gateways):
            port = free_port()
            argv = ([*stack.gateway.argv, "--port", str(port), "--grpc-port", str(free_port())]
                    if stack.gateway else [])
            child = stack.child(f"gateway #{index}", argv)
            child.start(stack._env)
            extra.append(child)
            urls.append(f"https://{settings.gateway.host}:{port}")
        time.sleep(3)  # the extra gateways start
        engine = load_engine(DEMO_NAME, demo_model_path().read_bytes())
        body, headers = encode_inputs(sample_inputs(engine.spec.inputs, 1))
        key = read_api_key(state)
        context = client_context(settings.ca_file)
        pids = part_pids(stack, extra)
        before = snapshot(pids)

        async def load() -> list[Any]:
            share = max(1, concurrency // len(urls))
            return list(await asyncio.gather(*(
                run_load(url, build_request(url, f"/v2/models/{DEMO_NAME}/infer", body,
                                            {**headers, "Authorization": f"Bearer {key}"}),
                         1, share, duration_s, 1.0, context) for url in urls)))

        started = time.monotonic()
        results = asyncio.run(load())
        elapsed = time.monotonic() - started
        requests = sum(result.requests for result in results)
        throughput = sum(result.throughput for result in results)
        # CPU over the whole run (warm-up included) per request completed in it
        cpu = per_request_ms(before, snapshot(pids), throughput * elapsed)
        return {"workers": workers, "gateways": gateways, "concurrency": concurrency,
                "throughput": round(throughput, 1), "requests": requests,
                "errors": sum(result.errors for result in results),
                "cpu_ms_per_request": cpu, "request_bytes": len(body)}
    finally:
        for child in extra:
            child.terminate()
            child.wait(10)
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--gateways", default="1,2")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    shapes = [(int(w), int(g)) for g in args.gateways.split(",") for w in args.workers.split(",")]
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with tqdm(total=len(shapes) * args.repeats, unit="run", file=sys.stderr) as bar:
        for _ in range(args.repeats):  # interleaved, so that drift hits every shape alike
            for workers, gateways in shapes:
                bar.set_description(f"{workers} worker(s), {gateways} gateway(s)")
                with tempfile.TemporaryDirectory(prefix="ppml-scaling-") as state:
                    runs.setdefault((workers, gateways), []).append(
                        measure(workers, gateways, args.concurrency, args.duration,
                                Path(state)))
                bar.update(1)
    table = []
    for results in runs.values():
        best = max(results, key=lambda r: r["throughput"])
        table.append({**best, "throughput": round(statistics.median(
            r["throughput"] for r in results), 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = ["| workers | gateways | req/s (median) | CPU ms/request: gateway | Redis | worker |",
             "|---|---|---|---|---|---|"]
    for row in table:
        cpu = row["cpu_ms_per_request"]
        lines.append(f"| {row['workers']} | {row['gateways']} | {row['throughput']} | "
                     f"{cpu['gateway']} | {cpu['redis']} | {cpu['worker']} |")
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
