"""Grafana dashboard and provisioning: valid, and broken copies rejected.

The dashboard must load as JSON, every panel query must name metrics that
daemon/metrics.py exposes (with the exposition suffixes), and, where promtool
is installed, every query must parse as PromQL.
"""

from __future__ import annotations

import json

import pytest
from ops_validation import (
    COMPOSE_FILE,
    DASHBOARD,
    GRAFANA_DIR,
    Mutation,
    dashboard_exprs,
    dashboard_problems,
    exposed_series_names,
    find_tool,
    grafana_provisioning_problems,
    promtool_expr_problems,
    provisioned_datasource_uids,
    replace,
)

DASH = DASHBOARD.read_text()
DATASOURCES = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
PROVIDERS = (GRAFANA_DIR / "provisioning" / "dashboards" / "fogline.yml").read_text()
COMPOSE = COMPOSE_FILE.read_text()
KNOWN = set(exposed_series_names())
UIDS = provisioned_datasource_uids(DATASOURCES)


def _drop_panel(title: str) -> Mutation:
    def mutate(text: str) -> str:
        dash = json.loads(text)
        before = len(dash["panels"])
        dash["panels"] = [p for p in dash["panels"] if p.get("title") != title]
        assert len(dash["panels"]) == before - 1, f"no panel {title!r}: update the test"
        return json.dumps(dash)

    return mutate


def _move_panel(title: str, x: int) -> Mutation:
    def mutate(text: str) -> str:
        dash = json.loads(text)
        (panel,) = [p for p in dash["panels"] if p.get("title") == title]
        panel["gridPos"]["x"] = x
        return json.dumps(dash)

    return mutate


def _duplicate_first_id(text: str) -> str:
    dash = json.loads(text)
    dash["panels"][2]["id"] = dash["panels"][1]["id"]
    return json.dumps(dash)


DASHBOARD_BREAKS: dict[str, tuple[Mutation, str]] = {
    "not JSON": (replace('"panels": [', '"panels": [,'), "JSON"),
    "misspelt metric": (
        replace(
            "max by (partition) (fogline_consumer_lag{",
            "max by (partition) (fogline_consumer_lags{",
        ),
        "unknown metrics ['fogline_consumer_lags']",
    ),
    "counter without _total": (
        replace("rate(fogline_records_in_total{", "rate(fogline_records_in{"),
        "unknown metrics ['fogline_records_in']",
    ),
    "series not pinned to its job": (
        replace(
            'min(fogline_query_snapshot_version{job=\\"fogline-api\\"})',
            "min(fogline_query_snapshot_version)",
        ),
        'Snapshot version/B: fogline_query_snapshot_version is not restricted to job="fogline-api"',
    ),
    "duplicate panel id": (_duplicate_first_id, "duplicate panel id"),
    "unprovisioned datasource": (
        replace('"uid": "prometheus"', '"uid": "prom-main"', 3),
        "datasource uid 'prom-main' is not provisioned",
    ),
    "panel off the grid": (replace('"w": 8,', '"w": 28,'), "bad gridPos"),
    "overlapping panels": (
        _move_panel("Surprisal", x=6),
        "Surprisal: overlaps ['Predictive KL and threshold']",
    ),
    "KL threshold no longer shown": (
        _drop_panel("Predictive KL and threshold"),
        "fogline_predictive_kl_threshold",
    ),
}


def test_dashboard_is_valid() -> None:
    assert dashboard_problems(DASH, KNOWN, UIDS) == []


@pytest.mark.parametrize("name", sorted(DASHBOARD_BREAKS))
def test_dashboard_check_rejects_broken_copy(name: str) -> None:
    mutate, expected = DASHBOARD_BREAKS[name]
    problems = dashboard_problems(mutate(DASH), KNOWN, UIDS)
    assert any(expected in p for p in problems), (name, problems)


def test_dashboard_follows_the_metrics_contract() -> None:
    """Renaming a metric in daemon/metrics.py without the dashboard fails here."""
    renamed = {n for n in KNOWN if not n.startswith("fogline_svi_loss")} | {"fogline_elbo_loss"}
    problems = dashboard_problems(DASH, renamed, UIDS)
    assert any("unknown metrics ['fogline_svi_loss']" in p for p in problems), problems


def test_provisioning_matches_compose_mounts() -> None:
    assert grafana_provisioning_problems(DATASOURCES, PROVIDERS, COMPOSE) == []
    moved = replace("path: /etc/grafana/dashboards", "path: /var/lib/grafana/dashboards")(PROVIDERS)
    problems = grafana_provisioning_problems(DATASOURCES, moved, COMPOSE)
    assert problems and "/var/lib/grafana/dashboards" in problems[0]
    no_uid = replace("    uid: prometheus\n", "")(DATASOURCES)
    assert grafana_provisioning_problems(no_uid, PROVIDERS, COMPOSE) == [
        "no prometheus datasource with uid and url"
    ]


needs_promtool = pytest.mark.skipif(
    find_tool("promtool") is None,
    reason="no promtool: run ops/install-validators.sh (structural checks still ran)",
)


@needs_promtool
def test_dashboard_queries_parse_as_promql() -> None:
    exprs = dashboard_exprs(json.loads(DASH))
    assert len(exprs) >= 20
    assert promtool_expr_problems(exprs) == []


@needs_promtool
def test_promql_check_rejects_broken_query() -> None:
    broken = replace(
        "sum by (le) (rate(fogline_batch_seconds_bucket",
        "sum by (le (rate(fogline_batch_seconds_bucket",
    )(DASH)
    assert promtool_expr_problems(dashboard_exprs(json.loads(broken)))
