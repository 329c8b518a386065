"""How much the state directory's disk takes per request: the managed Redis's AOF growth per
answered request, with its automatic rewrite held off so that every written byte counts.

    python bench/state_disk.py --requests 3000 --rows 1,256 --out bench/results

For each request size (rows of the demo model's 8x8 images) it sends ``--requests``
requests from 16 clients through a local stack (2 workers) and writes state_disk.json:
AOF bytes per request, and what that is per second at 1,000 req/s. Payloads of
``redis.payload_spool_min_bytes`` or more go through the spool instead of the AOF (files
removed once answered), so only their stream entries are in the AOF.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import redis

from ppml_serve.local_stack import LocalStack
from ppml_serve.models import DEMO_NAME, demo_model_path
from ppml_serve.settings import load_settings
from ppml_serve.state import read_api_key


async def _send(stack: LocalStack, requests: int, rows: int) -> int:
    key = read_api_key(stack.settings.state_dir)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [rows, 8, 8],
                        "data": np.zeros(rows * 64, dtype=np.uint8).tolist()}]}
    left, ok = list(range(requests)), 0
    async with httpx.AsyncClient(base_url=stack.url, verify=str(stack.settings.ca_file),
                                 headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        async def client() -> None:
            nonlocal ok
            while left:
                left.pop()
                response = await http.post(f"/v2/models/{DEMO_NAME}/infer", json=body)
                ok += response.status_code == 200
        await asyncio.gather(*(client() for _ in range(16)))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rows", default="1,256", help="comma list of rows per request")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ppml-disk-") as state:
        settings = load_settings(state_dir=Path(state), models={DEMO_NAME: demo_model_path()},
                                 gateway={"port": 0})
        stack = LocalStack(settings, workers=2, log_level="ERROR")
        try:
            stack.start()
            admin = redis.Redis.from_url(stack.redis.admin_url.get_secret_value(),
                                         ssl_ca_certs=str(settings.ca_file))
            admin.config_set("auto-aof-rewrite-percentage", 0)  # count every byte written
            for rows in (int(r) for r in args.rows.split(",")):
                before = int(admin.info("persistence")["aof_current_size"])
                ok = asyncio.run(_send(stack, args.requests, rows))
                grown = int(admin.info("persistence")["aof_current_size"]) - before
                per_request = grown / max(ok, 1)
                results.append({"rows": rows, "request_bytes": rows * 64, "answered": ok,
                                "aof_bytes_per_request": round(per_request),
                                "aof_mb_per_s_at_1000_rps": round(per_request * 1000 / 1e6, 2)})
                print(json.dumps(results[-1]), flush=True)
        finally:
            stack.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state_disk.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
