"""Old code against new on the null model, interleaved: the pipeline's own cost, before/after.

    python bench/compare.py --before 2f7b050 --after HEAD --pairs 5 \\
        --json bench/results/compare.json

Each revision's ``src`` is exported with ``git archive`` and run with ``ppml-serve bench
--null-model`` (secure, concurrency 1 and 32, one repeat) under its own ``PYTHONPATH``; the
two alternate, and which goes first alternates too, so that drift of a shared machine hits
both alike. It reports medians of each side and the median of the paired ratios
(after / before), the figure that survives a noisy machine best.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

from tqdm import tqdm

PARTS = ("gateway", "redis", "worker")
FIGURES = ("throughput", "p50_ms", "gateway", "front", "redis", "worker", "cpu_sum")


def resolve(revision: str) -> str:
    """The full commit id of ``revision`` (recorded instead of names such as HEAD)."""
    found = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        sys.exit(f"not a git revision here: {revision}")
    return found.stdout.strip()


def export(revision: str, into: Path) -> Path:
    """The revision's ``src`` tree under ``into``, with its native extension built in place
    when it has one (``native/``, via ``maturin build``); fails with git's or cargo's words."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "src", "native",
                              "pyproject.toml", "README.md", "LICENSE"],
                             capture_output=True, check=False)
    if archive.returncode != 0:  # an older revision without native/
        archive = subprocess.run(["git", "archive", "--format=tar", revision, "src"],
                                 capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"git archive {revision}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    if (into / "native").is_dir():
        wheels = into / "wheels"
        built = subprocess.run(["maturin", "build", "--release", "--quiet", "--out",
                                str(wheels)], cwd=into, capture_output=True, text=True,
                               check=False)
        if built.returncode != 0:
            sys.exit(f"building {revision}'s native extension failed:\n{built.stderr[-2000:]}")
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive_file:
                for name in archive_file.namelist():
                    if name.startswith("ppml_serve/_native"):
                        (into / "src" / name).write_bytes(archive_file.read(name))
    return into / "src"


def run_once(source: Path, args: argparse.Namespace, out: Path,
             settings: dict[str, str] | None = None) -> dict[int, dict[str, float]]:
    """One bench run of the code in ``source`` (with ``settings`` as ``PPML_*`` environment
    variables): figures by concurrency."""
    command = [sys.executable, "-m", "ppml_serve", "bench", "--null-model",
               "--configs", "secure", "--concurrency", "1,32", "--repeats", "1",
               "--duration", str(args.duration), "--json", str(out)]
    if args.protocol != "http":
        command += ["--protocol", args.protocol]
    env = {**os.environ, **(settings or {}), "PYTHONPATH": str(source)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench failed ({source}):\n{done.stderr[-2000:]}")
    figures: dict[int, dict[str, float]] = {}
    for run in json.loads(out.read_text()):
        if run["mode"] != "pipeline":
            continue
        cpu = run.get("cpu_ms_per_request", {})
        figures[run["concurrency"]] = {
            "throughput": run["throughput"], "p50_ms": run["p50_ms"],
            **{part: cpu.get(part, 0.0) for part in PARTS},
            "front": cpu.get("front", 0.0),
            "cpu_sum": round(sum(cpu.get(part, 0.0) for part in PARTS), 3)}
    return figures


def summarise(pairs: list[dict[str, dict[int, dict[str, float]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for concurrency in (1, 32):
        rows = {}
        for figure in FIGURES:
            before = [pair["before"][concurrency][figure] for pair in pairs]
            after = [pair["after"][concurrency][figure] for pair in pairs]
            ratios = [a / b for a, b in zip(after, before, strict=True) if b]
            rows[figure] = {"before": statistics.median(before),
                            "after": statistics.median(after),
                            # none where the old side lacks the figure (no front before)
                            "paired_ratio": (round(statistics.median(ratios), 3) if ratios
                                             else None)}
        summary[f"concurrency_{concurrency}"] = rows
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the old code")
    parser.add_argument("--after", default="HEAD", help="git revision of the new code")
    parser.add_argument("--pairs", type=int, default=5, help="before/after pairs to run")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write pairs and summary here")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http",
                        help="the load's protocol (grpc: both revisions' bench must have "
                             "--protocol)")
    for side in ("before", "after"):
        parser.add_argument(f"--{side}-setting", action="append", default=[],
                            metavar="PPML_NAME=VALUE",
                            help=f"a setting for the {side} side's service (repeatable), e.g. "
                                 "PPML_GATEWAY__FRONT=python: two configurations of one "
                                 "revision compared the same way")
    args = parser.parse_args()
    side_settings = {}
    for side in ("before", "after"):
        pairs_given = [item.partition("=") for item in getattr(args, f"{side}_setting")]
        if any(not name.startswith("PPML_") or not sep for name, sep, _ in pairs_given):
            parser.error(f"--{side}-setting takes PPML_NAME=VALUE")
        side_settings[side] = {name: value for name, _, value in pairs_given}
    if args.pairs < 1 or args.duration <= 0:
        parser.error("--pairs must be at least 1 and --duration positive")
    commits = {side: resolve(getattr(args, side)) for side in ("before", "after")}
    scratch = Path(tempfile.mkdtemp(prefix="ppml-compare-"))
    sources = {"before": export(commits["before"], scratch / "before")}
    sources["after"] = (sources["before"] if commits["after"] == commits["before"]
                        else export(commits["after"], scratch / "after"))
    pairs: list[dict[str, dict[int, dict[str, float]]]] = []
    with tqdm(total=2 * args.pairs, desc="bench runs", unit="run") as progress:
        for index in range(args.pairs):
            order = ("before", "after") if index % 2 == 0 else ("after", "before")
            pair = {}
            for side in order:
                pair[side] = run_once(sources[side], args, scratch / f"{side}-{index}.json",
                                      side_settings[side])
                progress.update()
            pairs.append(pair)
    summary = summarise(pairs)
    for concurrency, rows in summary.items():
        print(concurrency)
        for figure, row in rows.items():
            ratio = row["paired_ratio"]
            print(f"  {figure:10s} before {row['before']:9.2f}  after {row['after']:9.2f}  "
                  f"after/before (paired median) "
                  f"{'-' if ratio is None else format(ratio, '.3f')}")
    if args.json:
        args.json.write_text(json.dumps({
            "before": commits["before"], "after": commits["after"], "duration_s": args.duration,
            "protocol": args.protocol, "settings": side_settings,
            "summary": summary, "pairs": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
