"""Every PromQL expression the deployment files hold, and the metric names each one reads.

Sources: the Prometheus alerting rules (config/alerts.yml), the Grafana dashboard's panel
targets and template-variable queries, and the Grafana alert rule's Prometheus queries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
GRAFANA = CONFIG / "grafana"
ALERTS = CONFIG / "alerts.yml"
DASHBOARD = GRAFANA / "dashboards" / "tiercache.json"
GRAFANA_ALERTING = GRAFANA / "provisioning" / "alerting" / "tiercache.yml"
GRAFANA_DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"

#: Words that can stand where a metric name could and are not one. Function names need no
#: entry: a name followed by "(" is never a selector.
KEYWORDS = frozenset({
    "and", "or", "unless", "atan2",
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
})  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"\\]+)"')
_COMMENT = re.compile(r"#[^\n]*")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
# Not preceded by a name character, a digit's dot or `$` (so no `e3` out of `1e3`, no `m` out
# of `5m`); taken whole (no backtracking into a shorter name); not followed by "(" (a call).
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from bare names and `__name__="..."` matchers."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _COMMENT.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    names.update(m for m in _IDENTIFIER.findall(text) if m.lower() not in KEYWORDS)
    return names


def template_query_expr(query: str) -> str | None:
    """The PromQL inside a Grafana template query (`label_values(selector, label)`), if any."""
    match = _LABEL_VALUES.match(query)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Expr:
    source: str  # where it came from, for messages
    expr: str


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def alert_rule_exprs() -> list[Expr]:
    doc = _load_yaml(ALERTS)
    return [
        Expr(f"alerts.yml:{rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[Expr]:
    dashboard = load_dashboard()
    exprs = [
        Expr(f"dashboard panel {panel['id']} {panel.get('title')!r} {target.get('refId')}",
             target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]  # fmt: skip
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        inner = template_query_expr(text)
        if inner is not None:
            exprs.append(Expr(f"dashboard variable ${variable['name']}", inner))
    return exprs


def load_grafana_alerting() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(GRAFANA_ALERTING)
    return data


def grafana_alert_exprs() -> list[Expr]:
    doc = load_grafana_alerting()
    return [
        Expr(f"grafana rule {rule['uid']} {query['refId']}", query["model"]["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
        for query in rule["data"]
        if query.get("datasourceUid") != "__expr__"
    ]


def all_exprs() -> list[Expr]:
    return alert_rule_exprs() + dashboard_exprs() + grafana_alert_exprs()
