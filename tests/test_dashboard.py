"""The Grafana dashboard plots only metrics the gateway and workers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ppml_serve.gateway.app import Metrics
from ppml_serve.worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "ppml-serve.json"


def test_dashboard_uses_only_exported_metric_names() -> None:
    exported = set()
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            kind = family.type
            names = {family.name}
            if kind == "counter":
                names = {family.name + "_total"}
            elif kind == "histogram":
                names = {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
            exported |= names
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {name for panel in panels for target in panel["targets"]
            for name in re.findall(r"\bppml_[a-z_]+", target["expr"])}
    assert used, "the dashboard plots nothing"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_every_per_model_series_of_gateway_and_worker_has_model_and_version_labels() -> None:
    # found: request counters carried {model, version}, the queue, engine and batch series
    # {model="m@2"}: the dashboard showed nothing for every version above 1
    per_model = []
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            collector = registry._names_to_collectors.get(family.name)
            labels = set(getattr(collector, "_labelnames", ()))
            if "model" in labels:
                per_model.append((family.name, labels))
    assert len(per_model) >= 10, per_model
    assert all({"model", "version"} <= labels for _, labels in per_model), per_model
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        for target in panel["targets"]:
            grouping = re.findall(r"by \(([^)]*)\)", target["expr"])
            assert all("version" in group for group in grouping), target["expr"]
