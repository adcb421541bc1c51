"""deploy/prometheus: the scrape config, the alert rules and their promtool unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import (
    COMPOSE_FILE,
    DEPLOY,
    PROMETHEUS_CONFIG,
    RULES_FILE,
    RULES_TEST_FILE,
    load_yaml,
    metric_refs,
    recorded_refs,
    run_promtool,
    unknown_refs,
)

# What the issue asks alerts for, and the alerts that answer it.
REQUIRED_ALERTS = {
    "ImagebatchTenantBudgetNearlySpent",  # spend against a budget
    "ImagebatchTenantDailyBudgetBurn",  # predictive spend burn
    "ImagebatchTenantMonthlyBudgetBurn",
    "ImagebatchUpstreamBatchPastCompletionWindow",
    "ImagebatchItemFailureRatioHigh",
    "ImagebatchNoWorkerHeartbeat",
    "ImagebatchWorkerHeartbeatAbsent",
    "ImagebatchQueueBacklog",
    "ImagebatchModelShutdownSoon",  # a model used this week shuts down within 90 days
    "ImagebatchJobProjectedToMissDeadline",  # a job's forecast (p90) ends after its deadline
}
SEVERITIES = {"critical", "warning"}


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def alerts(rules: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        if "alert" in rule:
            by_name.setdefault(rule["alert"], []).append(rule)
    return by_name


def test_prometheus_config_and_its_rule_files_are_valid(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    # rule_files is relative to prometheus.yml, so this found and checked the rules too.
    assert "1 rule files found" in output


def test_rules_are_valid(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", RULES_FILE)


def test_rule_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(
        promtool, "test", "rules", RULES_TEST_FILE.name, cwd=RULES_TEST_FILE.parent
    )
    assert "SUCCESS" in output


def test_every_required_alert_exists(alerts: dict[str, list[dict[str, Any]]]) -> None:
    assert set(alerts) >= REQUIRED_ALERTS


def test_every_alert_has_severity_summary_and_description(
    alerts: dict[str, list[dict[str, Any]]],
) -> None:
    for name, variants in alerts.items():
        for rule in variants:
            assert rule["labels"]["severity"] in SEVERITIES, name
            assert rule["annotations"]["summary"].strip(), name
            assert len(rule["annotations"]["description"].split()) >= 10, name
            assert "for" in rule, f"{name} fires on a single evaluation; give it a `for:`"


def test_every_alert_is_tested_firing_and_not_firing(
    alerts: dict[str, list[dict[str, Any]]],
) -> None:
    cases = [
        case
        for test in load_yaml(RULES_TEST_FILE)["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for name in alerts:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name} is never tested firing"
        assert any(not c.get("exp_alerts") for c in mine), f"{name} is never tested not firing"
        for case in mine:
            for expected in case.get("exp_alerts") or []:
                # Annotations are compared too, so their templates are tested as rendered.
                assert set(expected["exp_annotations"]) == {"summary", "description"}, name


def test_rules_select_only_series_the_service_exposes(rules: list[dict[str, Any]]) -> None:
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        name = rule.get("alert") or rule["record"]
        assert not unknown_refs(rule["expr"]), f"{name}: {unknown_refs(rule['expr'])}"
        assert recorded_refs(rule["expr"]) <= recorded, f"{name} uses an unrecorded series"
        if "up{" not in rule["expr"]:
            assert metric_refs(rule["expr"]) or recorded_refs(rule["expr"]), name


def test_rules_match_the_scrape_job() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "imagebatch-api"]
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    services = load_yaml(COMPOSE_FILE)["services"]
    assert host in services and port == "8000"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert 'up{job="imagebatch-api"}' in RULES_FILE.read_text()


def test_compose_mounts_the_config_directory_where_prometheus_reads_it() -> None:
    prometheus = load_yaml(COMPOSE_FILE)["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # The unit tests sit beside the rules; the rule_files glob must not load them as rules.
    patterns = load_yaml(PROMETHEUS_CONFIG)["rule_files"]
    rules_dir = DEPLOY / "prometheus"
    loaded = {p for pattern in patterns for p in rules_dir.glob(pattern)}
    assert loaded == {RULES_FILE}


def test_readme_lists_every_alert(alerts: dict[str, list[dict[str, Any]]]) -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in alerts:
        assert name in readme, f"deploy/README.md does not describe {name}"
