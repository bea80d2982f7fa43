"""Every metric the alerts, the dashboard and the Grafana alert read is one the service exports.

A renamed metric otherwise fails silently: the panel goes blank and the alert never fires.
The names come from scraping the real app's /metrics after some cache traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.ops.promql import (
    alert_rule_exprs,
    all_exprs,
    dashboard_exprs,
    grafana_alert_exprs,
    metric_names,
    template_query_expr,
)
from tests.procs import RedisProcess

#: Series Prometheus makes itself for every target, not exported by the service.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


# --- the extractor: checked on its own first, so the real test cannot pass vacuously --------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="tiercache"} == 0', {"up"}),
        ("tiercache_mode{mode=\"degraded\", x='{a}'} == 1", {"tiercache_mode"}),
        (
            "histogram_quantile(0.99, sum by (le, route) "
            '(rate(req_seconds_bucket{instance=~"$instance"}[$__rate_interval])))',
            {"req_seconds_bucket"},
        ),
        (
            "sum by (job) (rate(hits_total[10m])) / (sum by (job) (rate(hits_total[10m])) "
            '+ sum by (job) (rate(misses_total{tier="database"}[10m]))) < 0.5 and '
            "sum without (instance) (rate(hits_total[10m])) > 0.1",
            {"hits_total", "misses_total"},
        ),
        (
            "a_total / on (instance) group_left (version) build_info offset 5m",
            {"a_total", "build_info"},
        ),
        ("a > bool 1e3 unless b or c and inf", {"a", "b", "c"}),
        ('{__name__="by_name_only", job="x"}', {"by_name_only"}),
        ("rate(x[5m:30s] @ end())", {"x"}),
        (
            "sum by (le) (increase(ping_bucket[$__range])) # a comment naming fake_metric",
            {"ping_bucket"},
        ),
        ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
        ("vector(1)", set()),
        ('label_replace(up, "a", "$1", "instance", "(.*):.*")', {"up"}),
    ],
)
def test_extractor(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_template_query_extraction() -> None:
    assert template_query_expr('label_values(tiercache_redis_up{job="x"}, instance)') == (
        'tiercache_redis_up{job="x"}'
    )
    assert template_query_expr("label_values(instance)") is None


def test_extractor_finds_a_sensible_number_of_names() -> None:
    alerts = set().union(*(metric_names(e.expr) for e in alert_rule_exprs()))
    dashboard = set().union(*(metric_names(e.expr) for e in dashboard_exprs()))
    grafana = set().union(*(metric_names(e.expr) for e in grafana_alert_exprs()))
    assert len(alert_rule_exprs()) >= 6
    assert len(dashboard_exprs()) >= 18
    assert len(alerts) >= 6, alerts
    assert len(dashboard) >= 12, dashboard
    assert grafana == {"tiercache_redis_up"}
    for item in all_exprs():
        assert metric_names(item.expr), f"{item.source}: no metric name found in {item.expr!r}"


# --- against the real service ----------------------------------------------------------------


async def _exported_sample_names(
    client: TestClient[Any, Any],
) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names in /metrics, and each family's sample names."""
    for i in range(3):
        resp = await client.post(
            "/api/performance/cache", json={"key": f"ops-{i}", "value": {"n": i}}
        )
        assert resp.status == 200, await resp.text()
    for key, status in (("ops-0", 200), ("ops-1", 200), ("never-written", 404)):
        resp = await client.get(f"/api/performance/cache/{key}")
        assert resp.status == status, await resp.text()
    resp = await client.head("/api/performance/cache/ops-2")
    assert resp.status == 200
    resp = await client.delete("/api/performance/cache/ops-2")
    assert resp.status == 200

    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {s.name for s in family.samples if not s.name.endswith("_created")}
    samples = set().union(*families.values())
    return samples, families


@pytest.fixture
async def exported(
    aiohttp_client: Any, redis_server: RedisProcess, tmp_path: Path
) -> tuple[set[str], dict[str, set[str]]]:
    settings = Settings(
        _env_file=None,
        redis_url=redis_server.url,
        cache_db_path=tmp_path / "cache.db",
        health_interval_seconds=0.2,
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return await _exported_sample_names(client)


async def test_service_exports_the_documented_families(
    exported: tuple[set[str], dict[str, set[str]]],
) -> None:
    samples, families = exported
    ours = {name for name in families if name.startswith("tiercache_")}
    assert len(ours) >= 14, sorted(ours)
    assert "tiercache_redis_up" in samples
    assert "tiercache_request_duration_seconds_bucket" in samples
    assert "process_resident_memory_bytes" in samples


async def test_every_referenced_metric_is_exported(
    exported: tuple[set[str], dict[str, set[str]]],
) -> None:
    samples, _ = exported
    referenced: dict[str, list[str]] = {}
    for item in all_exprs():
        for name in metric_names(item.expr):
            referenced.setdefault(name, []).append(item.source)
    assert len(referenced) >= 14, sorted(referenced)
    missing = {
        name: sources
        for name, sources in referenced.items()
        if name not in samples and name not in PROMETHEUS_SYNTHETIC
    }
    assert not missing, "PromQL reads metrics the service does not export: " + "; ".join(
        f"{name} (in {', '.join(sorted(set(src)))})" for name, src in missing.items()
    )


async def test_every_tiercache_metric_is_on_the_dashboard(
    exported: tuple[set[str], dict[str, set[str]]],
) -> None:
    """The other direction: a metric nobody can see is a metric nobody watches."""
    _, families = exported
    on_dashboard = set().union(*(metric_names(e.expr) for e in dashboard_exprs()))
    unseen = [
        family
        for family, sample_names in sorted(families.items())
        if family.startswith("tiercache_") and not sample_names & on_dashboard
    ]
    assert not unseen, f"no dashboard panel shows {unseen}"
