"""The Grafana dashboard and alert rule: valid, wired to the provisioned datasource, and made
of PromQL that Prometheus accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.promql import (
    DASHBOARD,
    GRAFANA,
    GRAFANA_DATASOURCES,
    all_exprs,
    dashboard_panels,
    load_dashboard,
    load_grafana_alerting,
    metric_names,
)

#: What Grafana substitutes for its variables, close enough for a syntax check.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    doc = yaml.safe_load(GRAFANA_DATASOURCES.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == 1
    (prometheus,) = [ds for ds in doc["datasources"] if ds["type"] == "prometheus"]
    uid = prometheus["uid"]
    assert isinstance(uid, str)
    assert uid
    return uid


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard_panels(dashboard) if p.get("type") != "row"]


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "tiercache"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None, "a provisioned dashboard has no id"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) >= 12
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    assert all(isinstance(i, int) for i in ids), ids


def test_every_panel_has_prometheus_targets(dashboard: dict[str, Any], datasource_uid: str) -> None:
    for panel in _panels(dashboard):
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, where
        targets = panel.get("targets") or []
        assert targets, f"{where} has no targets"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refIds {ref_ids}"
        for target in targets:
            assert str(target.get("expr", "")).strip(), f"{where} target {target['refId']}"
            assert target["datasource"]["uid"] == datasource_uid, where


def test_template_variables_use_the_provisioned_datasource(
    dashboard: dict[str, Any], datasource_uid: str
) -> None:
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["instance"]
    for variable in variables:
        assert variable["datasource"]["uid"] == datasource_uid
    # Every panel query honours the instance selector.
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] > 0, panel["id"]
        assert pos["h"] > 0, panel["id"]
        assert pos["x"] >= 0, panel["id"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['id']} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"


def _exprs_of(dashboard: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])


def test_dashboard_shows_what_an_operator_needs(dashboard: dict[str, Any]) -> None:
    text = _exprs_of(dashboard)
    names = metric_names(text)
    for metric in (
        "tiercache_tier_hits_total",
        "tiercache_tier_misses_total",
        "tiercache_requests_total",
        "tiercache_request_duration_seconds_bucket",
        "tiercache_mode",
        "tiercache_redis_up",
        "tiercache_redis_reconnect_attempts_total",
        "tiercache_redis_ping_duration_seconds_bucket",
        "tiercache_tier_entries",
        "tiercache_memory_bytes",
        "tiercache_memory_evictions_total",
    ):
        assert metric in names, f"no panel shows {metric}"
    assert re.search(r"sum by \(tier\) \(rate\(tiercache_tier_hits_total", text)
    assert re.search(r"sum by \(operation, outcome\) \(rate\(tiercache_requests_total", text)
    for quantile in ("0.5", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile}, sum by \(le, route\) "
            r"\(rate\(tiercache_request_duration_seconds_bucket",
            text,
        ), f"no p{quantile} request latency"
    units = {p["title"]: p["fieldConfig"]["defaults"].get("unit") for p in _panels(dashboard)}
    assert units["Request latency p50 / p99 by route"] == "s"
    assert units["Hit rate per tier"] == "percentunit"
    assert units["Memory tier bytes"] == "bytes"


def test_dashboard_provider_loads_from_a_file_folder() -> None:
    doc = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text(encoding="utf-8")
    )
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
    assert DASHBOARD.parent.name == "dashboards"


def test_grafana_alert_rule_is_wired(dashboard: dict[str, Any], datasource_uid: str) -> None:
    doc = load_grafana_alerting()
    assert doc["apiVersion"] == 1
    (group,) = doc["groups"]
    assert group["orgId"] == 1
    assert group["folder"]
    assert re.fullmatch(r"\d+[smh]", group["interval"])
    (rule,) = group["rules"]
    assert rule["uid"] == "tiercache-redis-disconnected"
    assert "redis" in rule["title"].lower()
    ref_ids = {query["refId"] for query in rule["data"]}
    assert rule["condition"] in ref_ids
    for query in rule["data"]:
        assert query["model"]["refId"] == query["refId"]
        assert query["relativeTimeRange"]["from"] > query["relativeTimeRange"]["to"] >= 0
        if query["datasourceUid"] == "__expr__":
            assert query["model"]["expression"] in ref_ids - {query["refId"]}
        else:
            assert query["datasourceUid"] == datasource_uid
            assert "tiercache_redis_up" in metric_names(query["model"]["expr"])
    (threshold,) = [q["model"] for q in rule["data"] if q["model"].get("type") == "threshold"]
    assert threshold["conditions"][0]["evaluator"] == {"type": "lt", "params": [1]}
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] == "critical"
    assert rule["annotations"]["summary"]
    assert rule["dashboardUid"] == dashboard["uid"]
    panel_ids = {p["id"] for p in dashboard_panels(dashboard)}
    assert rule["panelId"] in panel_ids


def test_every_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each dashboard, Grafana-alert and alert-rule expression."""
    exprs = all_exprs()
    assert len(exprs) >= 25
    rules = []
    for i, item in enumerate(exprs):
        expr = item.expr
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr.replace("$labels", ""), f"{item.source}: unknown variable in {expr}"
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(rules)} rules found" in output, output
