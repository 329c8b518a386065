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
