"""docs/grafana-dashboard.json and docs/prometheus-alerts.yml load, have the required
panels and alerts, and query only metrics ragcache really exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.test_metrics import exported_sample_names

DOCS = Path(__file__).resolve().parent.parent / "docs"

PROMQL_FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min", "count", "delta", "deriv",
    "floor", "histogram_quantile", "increase", "irate", "label_replace", "max", "max_over_time", "min",
    "min_over_time", "quantile", "rate", "round", "scalar", "sort", "sort_desc", "stddev", "sum", "time", "timestamp",
    "topk", "vector",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "offset", "bool"}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (PromQL functions, keywords, label
    matchers, grouping clauses, ranges and Grafana variables removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        name, call = match[1], match[2]
        if call and name in PROMQL_FUNCTIONS or name in PROMQL_KEYWORDS:
            continue
        assert not call, f"unknown PromQL function {name!r} in {expr!r}"
        names.add(name)
    return names


def test_metric_name_extraction():
    expr = 'sum by (policy) (rate(ragcache_lookups_total{result="hit",policy=~"$policy"}[5m] offset 1d)) / up and x'
    assert metric_names(expr) == {"ragcache_lookups_total", "up", "x"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))") == {"a_bucket"}
    assert metric_names("time() - max(t) > 600") == {"t"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = exported_sample_names()
    assert "ragcache_lookups_total" in names  # the registry really holds ragcache's metrics
    return names


def check_expr(expr: str, exported: set[str]) -> set[str]:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    assert names <= exported, f"{sorted(names - exported)} are not exported by ragcache ({expr!r})"
    return names


def test_grafana_dashboard(exported):
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    check_expr(variables["policy"]["definition"].replace("label_values(", "").split(",")[0], exported)

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used |= check_expr(target["expr"], exported)

    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    assert 'result="hit"' in exprs["Hit rate per policy"] and "by (policy)" in exprs["Hit rate per policy"]
    assert "by (result)" in exprs["Lookups/s by result"]
    latency = exprs["Lookup latency p50 / p99"]
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency
    for metric in ("ragcache_tokens_avoided_total", "ragcache_cost_avoided_total", "ragcache_usage_backlog",
                   "ragcache_redis_up", "ragcache_last_aggregation_timestamp_seconds",
                   "ragcache_aggregation_runs_total", "ragcache_lookup_seconds_bucket"):
        assert metric in used


REQUIRED_ALERTS = {
    "RagcacheHitRateCollapse", "RagcacheRefusalSpike", "RagcacheUsageBacklogGrowing", "RagcacheRedisDown",
    "RagcacheAggregationStale", "RagcacheAggregationFailing", "RagcacheRedisRefusingWrites", "RagcacheDatabaseDown",
    "RagcacheBrokerDown", "RagcacheMetricsMissing",
}


def test_prometheus_alert_rules(exported):
    rules_file = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    assert set(rules_file) == {"groups"}
    alerts = {}
    for group in rules_file["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            check_expr(rule["expr"], exported)
            alerts[rule["alert"]] = rule
    assert REQUIRED_ALERTS <= set(alerts)
    assert len(alerts) == sum(len(g["rules"]) for g in rules_file["groups"])  # names are unique
    assert "ragcache_redis_up" in alerts["RagcacheRedisDown"]["expr"]
    assert alerts["RagcacheRedisDown"]["labels"]["severity"] == "critical"
    assert 'reason!="redis_full"' in alerts["RagcacheRefusalSpike"]["expr"]
    assert "ragcache_usage_lag_seconds" in alerts["RagcacheAggregationStale"]["expr"]
    for name, rule in alerts.items():
        # No "or vector(0)", "absent() * ..." or "time() - (x or 0)": an unknown value stays unknown.
        assert not re.search(r"\bor\s+vector\(|\bor\s+on\s*\(\)\s*vector\(", rule["expr"]), name
        if name != "RagcacheMetricsMissing":
            assert "absent(" not in rule["expr"], name
    # Each outage's alert is kept quiet by nothing but a cause upstream of it.
    assert "unless" not in alerts["RagcacheRedisDown"]["expr"]
    assert "unless" not in alerts["RagcacheDatabaseDown"]["expr"]
    for symptom in ("RagcacheAggregationStale", "RagcacheLookupErrors"):
        assert "min(ragcache_redis_up) == 0" in alerts[symptom]["expr"], symptom
    for cause in ("ragcache_redis_up", "ragcache_redis_masters_full", "ragcache_database_up", "ragcache_broker_up",
                  'ragcache_aggregation_runs_total{result="error"}'):
        assert cause in alerts["RagcacheAggregationStale"]["expr"].split("unless", 1)[1], cause

