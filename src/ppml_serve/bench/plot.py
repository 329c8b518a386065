"""Throughput chart in the spirit of the original PPML serving figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    names = list(dict.fromkeys(run["name"] for run in runs))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(names):
        colour = colours[index % len(colours)]
        pipeline = sorted((r for r in runs if r["name"] == name and r["mode"] == "pipeline"),
                          key=lambda r: r["concurrency"])
        if pipeline:
            axis.plot([r["concurrency"] for r in pipeline], [r["throughput"] for r in pipeline],
                      marker="o", color=colour, label=f"{name} (pipeline)")
        raw = [r["throughput"] for r in runs if r["name"] == name and r["mode"] == "raw"]
        if raw:
            axis.axhline(max(raw), color=colour, linestyle="--", linewidth=1,
                         label=f"{name} (raw engine, best batch)")
    values = [run["throughput"] for run in runs if run["throughput"] > 0]
    if values and max(values) / min(values) > 50:
        axis.set_yscale("log")  # a tiny model's raw engine dwarfs any served rate
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent requests")
    axis.set_ylabel("throughput (items/s)")
    axis.set_title("ppml-serve: pipeline vs raw engine")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
