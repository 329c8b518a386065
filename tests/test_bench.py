"""``ppml-serve bench``: short real runs of the demo model; JSON fields and chart written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ppml_serve.bench.runner import summarize

FIELDS = {"name", "engine", "precision", "secure", "mode", "concurrency", "throughput",
          "p50_ms", "p95_ms", "p99_ms", "errors"}


def test_bench_writes_runs_and_plot(tmp_path: Path) -> None:
    out, chart = tmp_path / "runs.json", tmp_path / "chart.png"
    completed = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "bench", "--configs", "secure,plain",
         "--concurrency", "1,4", "--duration", "0.6", "--warmup", "0.2",
         "--max-batch-size", "4", "--repeats", "2", "--gateways", "2",
         "--json", str(out), "--plot", str(chart)],
        capture_output=True, text=True, timeout=180, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(out.read_text())
    secure, plain = "demo-onnxruntime-fp32-secure", "demo-onnxruntime-fp32-plain"
    assert {(r["name"], r["mode"], r["concurrency"], r["batch_size"]) for r in runs} == {
        (secure, "raw", 1, 1), (secure, "raw", 1, 4), (secure, "pipeline", 1, 1),
        (secure, "pipeline", 4, 1), (plain, "raw", 1, 1), (plain, "raw", 1, 4),
        (plain, "pipeline", 1, 1), (plain, "pipeline", 4, 1)}
    for run in runs:
        assert set(run) >= FIELDS
        assert run["errors"] == 0 and run["throughput"] > 0
        assert len(run["throughput_repeats"]) == 2
        assert run["precision"] == "fp32" and run["engine"] == "onnxruntime"
    assert {r["secure"] for r in runs if r["name"] == plain} == {False}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pipeline/raw" in completed.stdout and "secure/plain" in completed.stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--concurrency", "1,x"], "--concurrency: expected a comma list of integers"),
    (["--engines", "tensorrt"], "--engines: unknown value(s) ['tensorrt']"),
    (["--precisions", "bf16"], "bf16 needs --engines openvino"),
    (["--model", "m=/no/such.onnx"], "--model: no such file"),
])
def test_bench_rejects_bad_flags(flags: list[str], message: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "bench", *flags],
        capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2
    assert message in completed.stderr


def test_summary_ratios() -> None:
    runs = [{"name": "m-secure", "mode": "raw", "throughput": 100.0},
            {"name": "m-secure", "mode": "pipeline", "throughput": 40.0},
            {"name": "m-secure", "mode": "pipeline", "throughput": 90.0},
            {"name": "m-plain", "mode": "pipeline", "throughput": 93.0}]
    assert summarize(runs) == ["m-secure: pipeline/raw = 0.90 (90.0 vs 100.0 items/s)",
                               "m: secure/plain = 0.97 (90.0 vs 93.0 items/s)"]


def test_bench_against_a_running_service(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "runs.json"
    completed = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "bench", "--url", stack.url, "--api-key-file",
         str(stack.settings.state_dir / "api-key"), "--ca-file", str(stack.ca_file),
         "--concurrency", "2", "--duration", "0.5", "--warmup", "0.2", "--repeats", "1",
         "--max-batch-size", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert [r["mode"] for r in runs] == ["raw", "pipeline"]
    assert runs[1]["url"] == stack.url and runs[1]["secure"] is True
    assert runs[1]["errors"] == 0 and runs[1]["throughput"] > 0


def test_closed_loop_throughput_uses_the_response_time_law() -> None:
    from ppml_serve.bench.load import LoadResult

    # 4 connections, each request takes 100 ms: 40 requests/s whatever the window catches.
    result = LoadResult(4, 1.0, 36, 36, 0, [100.0] * 36, closed_loop=True)
    assert abs(result.throughput - 40.0) < 1e-9
    assert result.window_throughput == 36.0
    raw = LoadResult(1, 2.0, 10, 160, 0, [200.0] * 10)
    assert raw.throughput == 80.0
