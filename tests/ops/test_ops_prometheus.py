"""Prometheus scrape config and alert rules: valid, and broken copies rejected.

``promtool check config|rules`` and ``promtool test rules`` (the unit tests in
``ops/prometheus/alerts.test.yml`` that show each alert firing and not firing)
run when promtool is installed (``ops/install-validators.sh``); the structural
checks (fields, durations, metric names from daemon/metrics.py, runbook
sections) always run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ops_validation import (
    COMPOSE_FILE,
    PROMETHEUS_DIR,
    RUNBOOK,
    Mutation,
    alert_rules_problems,
    exposed_series_names,
    find_tool,
    promtool_config_problems,
    promtool_rules_problems,
    promtool_unit_test_problems,
    replace,
    scrape_config_problems,
)

ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS = ALERTS_FILE.read_text()
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
PROMETHEUS_FILE = PROMETHEUS_DIR / "prometheus.yml"
PROMETHEUS = PROMETHEUS_FILE.read_text()
RUNBOOK_TEXT = RUNBOOK.read_text()
KNOWN = set(exposed_series_names())

RULE_BREAKS: dict[str, tuple[Mutation, str]] = {
    "yaml syntax error": (replace("groups:\n", "groups: [\n"), "YAML"),
    "misspelt metric": (
        replace("fogline_consumer_lag{", "fogline_consumer_lags{"),
        "unknown metrics ['fogline_consumer_lags']",
    ),
    "counter without _total": (
        replace(
            "rate(fogline_records_dead_lettered_total{",
            "rate(fogline_records_dead_lettered{",
        ),
        "unknown metrics ['fogline_records_dead_lettered']",
    ),
    "histogram without _bucket": (
        replace(
            "rate(fogline_query_request_seconds_bucket{",
            "rate(fogline_query_request_seconds{",
        ),
        "unknown metrics ['fogline_query_request_seconds']",
    ),
    "series not pinned to its job": (
        replace(
            'max by (job) (fogline_redis_up{job="fogline-daemon"})',
            "max by (job) (fogline_redis_up)",
        ),
        'FoglineRedisDown: fogline_redis_up is not restricted to job="fogline-daemon"',
    ),
    "query metric pinned to the daemon": (
        replace(
            'fogline_query_request_seconds_bucket{job="fogline-api"}',
            'fogline_query_request_seconds_bucket{job="fogline-daemon"}',
        ),
        'fogline_query_request_seconds_bucket is not restricted to job="fogline-api"',
    ),
    "bad for duration": (replace("for: 30m", "for: half an hour"), "'for' is not a duration"),
    "missing severity": (replace("severity: critical", "team: ml"), "labels.severity"),
    "missing summary": (
        replace('summary: "fogline has not settled', 'title: "fogline has not settled'),
        "annotations.summary missing",
    ),
    "runbook link without section": (
        replace("runbook: ops/runbook.md#foglinedriftshifted", "runbook: ops/runbook.md#drift"),
        "has no section in ops/runbook.md",
    ),
    "required alert missing": (
        replace("alert: FoglineQueryLatencyHigh", "alert: FoglineQuerySlow"),
        "required alert FoglineQueryLatencyHigh missing",
    ),
    "duplicate alert": (
        replace("alert: FoglineRedisDown", "alert: FoglineDaemonDown"),
        "FoglineDaemonDown: defined twice",
    ),
}


def test_alert_rules_structure_is_valid() -> None:
    assert alert_rules_problems(ALERTS, RUNBOOK_TEXT, KNOWN) == []


@pytest.mark.parametrize("name", sorted(RULE_BREAKS))
def test_alert_rules_structure_rejects_broken_copy(name: str) -> None:
    mutate, expected = RULE_BREAKS[name]
    problems = alert_rules_problems(mutate(ALERTS), RUNBOOK_TEXT, KNOWN)
    assert any(expected in p for p in problems), (name, problems)


def test_runbook_without_a_section_is_rejected() -> None:
    runbook = replace("## FoglineStepsRejected", "## Rejected steps")(RUNBOOK_TEXT)
    problems = alert_rules_problems(ALERTS, runbook, KNOWN)
    assert problems == [
        "FoglineStepsRejected: runbook link 'ops/runbook.md#foglinestepsrejected' "
        "has no section in ops/runbook.md"
    ]


def test_runbook_explains_rollback() -> None:
    assert "fogline snapshot rollback --model" in RUNBOOK_TEXT


def test_scrape_config_reaches_compose_services() -> None:
    compose = COMPOSE_FILE.read_text()
    assert scrape_config_problems(PROMETHEUS, compose) == []
    wrong_port = replace('"fogline-daemon:9400"', '"fogline-daemon:9401"')(PROMETHEUS)
    assert scrape_config_problems(wrong_port, compose) == [
        "job fogline-daemon does not scrape fogline-daemon:9400"
    ]
    no_rules = replace("  - alerts.yml", "  - rules.yml")(PROMETHEUS)
    assert scrape_config_problems(no_rules, compose) == ["rule_files does not load alerts.yml"]


KEYED_SCRAPE_BREAKS: dict[str, tuple[Mutation, Mutation, str]] = {
    "no job finds the replicas": (
        replace('      - names: ["fogline-keyed"]', '      - names: ["fogline-keyd"]'),
        lambda c: c,
        "no dns_sd_configs job finds every replica of fogline-keyed",
    ),
    "SRV lookup of an A name": (
        replace("        type: A\n        port: 9400", "        type: SRV"),
        lambda c: c,
        "job fogline-keyed: dns_sd type 'SRV', not A",
    ),
    "wrong port": (
        replace("        type: A\n        port: 9400", "        type: A\n        port: 9401"),
        lambda c: c,
        "job fogline-keyed: dns_sd port 9401, fogline-keyed listens on 9400",
    ),
    "a static target": (
        replace(
            '      - targets: ["fogline-daemon:9400"]',
            '      - targets: ["fogline-daemon:9400", "fogline-keyed:9400"]',
        ),
        lambda c: c,
        "job fogline-daemon: static target fogline-keyed reaches one replica only",
    ),
    "metrics on the replica's loopback": (
        lambda p: p,
        replace(
            '      FOGLINE_STREAM__PREFETCH: "true"\n      FOGLINE_METRICS_PORT: 9400\n'
            "      FOGLINE_METRICS_HOST: 0.0.0.0\n",
            '      FOGLINE_STREAM__PREFETCH: "true"\n      FOGLINE_METRICS_PORT: 9400\n',
        ),
        "fogline-keyed: FOGLINE_METRICS_HOST is not 0.0.0.0",
    ),
    "replicas on another port": (
        lambda p: p,
        replace(
            '      FOGLINE_STREAM__PREFETCH: "true"\n      FOGLINE_METRICS_PORT: 9400\n',
            '      FOGLINE_STREAM__PREFETCH: "true"\n      FOGLINE_METRICS_PORT: 9500\n',
        ),
        "job fogline-keyed: dns_sd port 9400, fogline-keyed listens on 9500",
    ),
}


def test_scrape_config_finds_every_keyed_replica() -> None:
    """Compose's scaled ``fogline-keyed`` replicas: one target each, by DNS (type A)."""
    compose = COMPOSE_FILE.read_text()
    assert "fogline-keyed" in compose
    assert scrape_config_problems(PROMETHEUS, compose) == []


@pytest.mark.parametrize("name", sorted(KEYED_SCRAPE_BREAKS))
def test_scrape_config_rejects_a_keyed_job_that_misses_replicas(name: str) -> None:
    mutate_prom, mutate_compose, expected = KEYED_SCRAPE_BREAKS[name]
    problems = scrape_config_problems(
        mutate_prom(PROMETHEUS), mutate_compose(COMPOSE_FILE.read_text())
    )
    assert any(expected in p for p in problems), (name, problems)


# --- promtool ---------------------------------------------------------------------------
needs_promtool = pytest.mark.skipif(
    find_tool("promtool") is None,
    reason="no promtool: run ops/install-validators.sh (structural checks still ran)",
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    assert promtool_config_problems(PROMETHEUS_FILE, ALERTS_FILE) == []
    assert promtool_rules_problems(ALERTS_FILE) == []


@needs_promtool
@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("bad scrape interval", replace("scrape_interval: 15s", "scrape_interval: 15 seconds")),
        ("unknown key", replace("scrape_configs:", "scrape_config:")),
        ("bad target", replace('"fogline-api:8000"', '"http://fogline-api:8000/metrics"')),
        (
            "dns_sd without a port",
            replace("        type: A\n        port: 9400\n", "        type: A\n"),
        ),
        ("dns_sd unknown type", replace("        type: A\n", "        type: AAAAA\n")),
    ],
)
def test_promtool_rejects_broken_config(name: str, mutate: Mutation, tmp_path: Path) -> None:
    broken = _write(tmp_path, "prometheus.yml", mutate(PROMETHEUS))
    assert promtool_config_problems(broken, ALERTS_FILE), f"promtool accepted: {name}"


@needs_promtool
@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        (
            "promql syntax",
            replace("max(fogline_policy_state{job=", "max(fogline_policy_state{job=="),
        ),
        ("unbalanced parenthesis", replace("> 0.1\n", ")) > 0.1\n")),
        ("bad for", RULE_BREAKS["bad for duration"][0]),
        ("bad template", replace("{{ $labels.endpoint }} is", "{{ $labels.endpoint is")),
    ],
)
def test_promtool_rejects_broken_rules(name: str, mutate: Mutation, tmp_path: Path) -> None:
    broken = _write(tmp_path, "alerts.yml", mutate(ALERTS))
    assert promtool_rules_problems(broken), f"promtool accepted: {name}"
    # A broken rule file also fails the config check, which loads it.
    assert promtool_config_problems(PROMETHEUS_FILE, broken)


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    assert promtool_unit_test_problems(ALERTS_FILE, ALERT_TESTS) == []


@needs_promtool
@pytest.mark.parametrize(
    ("name", "mutate", "alert"),
    [
        (
            "dead-letter threshold raised",
            replace("> 0.01\n", "> 0.2\n"),
            "FoglineDeadLetterRateHigh",
        ),
        ("drift window too long", replace("for: 30m", "for: 60m"), "FoglineDriftShifted"),
        (
            "lag counted per replica",
            replace(
                'sum(max by (partition) (fogline_consumer_lag{job="fogline-daemon"})) > 10000',
                'sum(fogline_consumer_lag{job="fogline-daemon"}) > 100000',
            ),
            "FoglineConsumerLagGrowing",
        ),
        (
            "redis judged per replica (standbys report 0)",
            replace(
                'max by (job) (fogline_redis_up{job="fogline-daemon"}) == 0',
                'fogline_redis_up{job="fogline-daemon"} == 0',
            ),
            "FoglineRedisDown",
        ),
        (
            "snapshot age judged on one replica",
            replace(
                'max(fogline_snapshot_last_write_timestamp_seconds{job="fogline-daemon"})',
                'min(fogline_snapshot_last_write_timestamp_seconds{job="fogline-daemon"})',
            ),
            "FoglineNoRecentSnapshot",
        ),
    ],
)
def test_alert_unit_tests_catch_changed_rule(
    name: str, mutate: Mutation, alert: str, tmp_path: Path
) -> None:
    broken = _write(tmp_path, "alerts.yml", mutate(ALERTS))
    problems = promtool_unit_test_problems(broken, ALERT_TESTS)
    assert problems and alert in problems[0], (name, problems)
