"""The Prometheus config and alerting rules are valid, and the rules pass their unit tests."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.ops.promql import ALERTS, CONFIG, REPO

PROMETHEUS_YML = CONFIG / "prometheus.yml"
ALERTS_TEST = CONFIG / "alerts_test.yml"

EXPECTED_ALERTS = {
    "TiercacheTargetDown",
    "TiercacheRedisDown",
    "TiercacheDegraded",
    "TiercacheModeFlapping",
    "TiercacheLowHitRate",
    "TiercacheRedisRestarted",
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(ALERTS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output, output


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(ALERTS_TEST))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output, output
    assert "FAILED" not in output, output


def test_promtool_check_config(promtool: str) -> None:
    result = _run(promtool, "check", "config", str(PROMETHEUS_YML))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is valid prometheus config file syntax" in output, output
    # The rule file is found and loaded through the config, not only on its own.
    assert "SUCCESS: 1 rule files found" in output, output


def test_prometheus_config_scrapes_both_instances_and_loads_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["tiercache"]["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == ["tiercache-1:8080", "tiercache-2:8080"]
    assert jobs["tiercache"].get("metrics_path", "/metrics") == "/metrics"


def test_every_alert_is_defined_with_severity_and_annotations() -> None:
    rules = _rules()
    names = [rule.get("alert") for rule in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    for rule in rules:
        labels = rule.get("labels") or {}
        annotations = rule.get("annotations") or {}
        assert labels.get("severity") in {"critical", "warning", "info"}, rule["alert"]
        assert str(annotations.get("summary", "")).strip(), rule["alert"]
        assert str(annotations.get("description", "")).strip(), rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_case_in_the_unit_tests() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == EXPECTED_ALERTS, f"no firing case for {EXPECTED_ALERTS - fires}"
    assert quiet == EXPECTED_ALERTS, f"no quiet case for {EXPECTED_ALERTS - quiet}"


def test_low_hit_rate_counts_a_miss_only_when_the_database_misses() -> None:
    (rule,) = [r for r in _rules() if r["alert"] == "TiercacheLowHitRate"]
    expr = str(rule["expr"])
    misses = re.findall(r"tiercache_tier_misses_total(\{[^}]*\})?", expr)
    assert misses, expr
    assert all(m == '{tier="database"}' for m in misses), expr
    # Guarded against low/zero traffic, not only the ratio.
    assert re.search(r"\)\s*>\s*[0-9.]+\s*$", expr.strip()), expr
