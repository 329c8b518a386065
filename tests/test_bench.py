"""``ppml-serve bench``: short real runs of the demo model; JSON fields and chart written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ppml_serve.bench.runner import summarize

FIELDS = {"name", "engine", "precision", "secure", "mode", "concurrency", "throughput",
          "p50_ms", "p95_ms", "p99_ms", "errors"}


def test_bench_writes_runs_and_plot(tmp_path: Path) -> None:
    out, chart = tmp_path / "runs.json", tmp_path / "chart.png"
    completed = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "bench", "--configs", "secure,plain",
         "--concurrency", "1,4", "--duration", "0.6", "--warmup", "0.2",
         "--max-batch-size", "4", "--json", str(out), "--plot", str(chart)],
        capture_output=True, text=True, timeout=180, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert {(r["name"], r["mode"], r["concurrency"]) for r in runs} >= {
        ("demo-secure", "raw", 1), ("demo-secure", "raw", 4), ("demo-secure", "pipeline", 1),
        ("demo-secure", "pipeline", 4), ("demo-plain", "pipeline", 4)}
    for run in runs:
        assert set(run) >= FIELDS
        assert run["errors"] == 0 and run["throughput"] > 0
    assert [r["secure"] for r in runs if r["name"] == "demo-plain"] == [False] * 4
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pipeline/raw" in completed.stdout


def test_bench_rejects_bad_flags() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "bench", "--concurrency", "1,x"],
        capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2
    assert "--concurrency: expected a comma list of integers" in completed.stderr


def test_summary_ratios() -> None:
    runs = [{"name": "m", "mode": "raw", "throughput": 100.0},
            {"name": "m", "mode": "pipeline", "throughput": 40.0},
            {"name": "m", "mode": "pipeline", "throughput": 90.0}]
    assert summarize(runs) == ["m: pipeline/raw = 0.90 (90.0 vs 100.0 items/s)"]
