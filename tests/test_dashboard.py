"""The Grafana dashboard (cluster/grafana/sceneref.json) shows the metrics deployments/metrics.py
defines, under the names Ray's metrics agent exports: every panel query names only defined
metrics, and every defined metric is on some panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deployments.metrics import EXPORT_PREFIX, METRICS

DASHBOARD = Path(__file__).resolve().parent.parent / "cluster" / "grafana" / "sceneref.json"
NAME = re.compile(r"\bray_sceneref_[a-z0-9_]+")


def exported_names() -> dict[str, str]:
    """Every series name Prometheus sees -> the metric defined in code."""
    names = {}
    for name, (kind, *_rest) in METRICS.items():
        full = EXPORT_PREFIX + name
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update({full + suffix: name for suffix in suffixes})
    return names


def panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_every_panel_query_names_defined_metrics_only():
    known = exported_names()
    for panel in panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = NAME.findall(target["expr"])
            assert used, f"{panel['title']}: {target['expr']} names no sceneref metric"
            unknown = [name for name in used if name not in known]
            assert not unknown, f"{panel['title']}: {unknown} are not defined in deployments/metrics.py"


def test_every_defined_metric_is_on_the_dashboard():
    known = exported_names()
    shown = {known[name] for panel in panels() for t in panel["targets"] for name in NAME.findall(t["expr"]) if name in known}
    assert shown == set(METRICS)


def test_metric_names_follow_prometheus_conventions_and_labels_carry_no_user_data():
    for name, (kind, description, labels, buckets) in METRICS.items():
        assert name.startswith("sceneref_") and description
        assert name.endswith("_total") == (kind == "counter"), name
        assert (buckets is not None) == (kind == "histogram") and (buckets is None or buckets == sorted(buckets))
        assert not {"user", "owner", "sub", "prompt", "generation_id"} & set(labels), name


def test_panels_have_unique_ids_and_a_prometheus_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["type"] == "prometheus"
