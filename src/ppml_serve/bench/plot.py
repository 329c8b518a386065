"""Throughput chart in the spirit of the original PPML serving figure: for each engine and
precision, the raw engine next to the plain and the secure pipeline (best concurrency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _group(run: dict[str, Any]) -> str:
    name = str(run["name"])
    for suffix in ("-secure", "-plain"):
        name = name.removesuffix(suffix)
    return name


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(_group(run) for run in runs))
    series: dict[str, list[float]] = {"raw engine": [], "pipeline, plain": [],
                                      "pipeline, secure": []}
    for group in groups:
        members = [run for run in runs if _group(run) == group]

        def best(mode: str, secure: bool | None, members: list[dict[str, Any]] = members
                 ) -> float:
            values = [r["throughput"] for r in members if r["mode"] == mode
                      and (secure is None or r["secure"] == secure)]
            return max(values, default=0.0)

        series["raw engine"].append(best("raw", None))
        series["pipeline, plain"].append(best("pipeline", False))
        series["pipeline, secure"].append(best("pipeline", True))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.9 * len(groups)), 4.5))
    width = 0.27
    for offset, (label, values) in enumerate(series.items()):
        positions = [index + (offset - 1) * width for index in range(len(groups))]
        bars = axis.bar(positions, values, width, label=label)
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels([g.replace("-", "\n", 1) for g in groups], fontsize=8)
    axis.set_ylabel("throughput (items/s, best concurrency)")
    axis.set_title("ppml-serve: raw engine vs plain and secure pipeline")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
