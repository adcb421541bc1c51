"""deploy/grafana: provisioning, and a dashboard whose every panel shows data.

Each panel's query is checked three ways: it selects only series (and labels) the service
exposes, promtool parses it, and, fed one synthetic series of every metric, it returns data;
a panel that would sit on "No data" against a live service fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    COMPOSE_FILE,
    DEPLOY,
    load_dashboard,
    load_yaml,
    metric_refs,
    run_promtool,
    series_names,
    unknown_refs,
)

DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "imagebatch.yml"

# What the issue asks the dashboard to show: a panel title matching each pattern.
REQUIRED_PANELS = {
    "spend per job": r"spend per job",
    "spend per campaign": r"campaign",
    "spend per model": r"model",
    "tokens by kind": r"tokens by kind",
    "images per second": r"images per second",
    "failures": r"fail",
    "budget use": r"budget",
    "queue tokens": r"queue tokens",
    "upstream batches by status": r"upstream batches by status",
    "task durations": r"task duration",
    "queue depth": r"queue depth",
}
# Grafana's variables, as a 1h-wide dashboard on a 15s scrape would expand them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$tenant": ".*",
    "$model": ".*",
}
_TARGET = 'job="imagebatch-api",instance="api:8000"'
# One series (two for images: both outcomes) of every metric, a minute apart for three hours:
# "<series> <promtool values>" per line.
_SYNTHETIC = """
imagebatch_job_tokens_total{job_id="job-1",tenant="acme",model="gpt-image-2",kind="image_output"}    0+400x180
imagebatch_job_cost_usd_total{job_id="job-1",tenant="acme",model="gpt-image-2",tier="batch"}         0+0.02x180
imagebatch_tokens_total{tenant="acme",model="gpt-image-2",kind="image_output",tier="batch"}          0+400x180
imagebatch_cost_usd_total{tenant="acme",model="gpt-image-2",tier="batch",campaign="spring"}          0+0.02x180
imagebatch_images_total{model="gpt-image-2",status="succeeded"}                                      0+9x180
imagebatch_images_total{model="gpt-image-2",status="failed"}                                         0+1x180
imagebatch_jobs{status="running"}                                                                    2x180
imagebatch_jobs_finished_total{status="succeeded"}                                                   0+1x180
imagebatch_items{state="submitted"}                                                                  100x180
imagebatch_upstream_batches{status="in_progress"}                                                    3x180
imagebatch_upstream_batch_oldest_age_seconds                                                         3600+60x180
imagebatch_upstream_completion_window_seconds                                                        86400x180
imagebatch_upstream_requests_total{endpoint="batches.create",status="200"}                           0+5x180
imagebatch_upstream_rate_limited_total{endpoint="images.generate"}                                   0+1x180
imagebatch_task_duration_seconds_bucket{task="batches.sweep",le="0.1"}                               0+8x180
imagebatch_task_duration_seconds_bucket{task="batches.sweep",le="1"}                                 0+10x180
imagebatch_task_duration_seconds_bucket{task="batches.sweep",le="+Inf"}                              0+10x180
imagebatch_task_duration_seconds_sum{task="batches.sweep"}                                           0+1.5x180
imagebatch_task_duration_seconds_count{task="batches.sweep"}                                         0+10x180
imagebatch_collect_bytes_total                                                                       0+1000000x180
imagebatch_queue_depth{queue="collect"}                                                              5x180
imagebatch_worker_heartbeat_timestamp_seconds{worker="collect@host-1"}                               0+60x180
imagebatch_tenant_spend_usd{tenant="acme",period="day"}                                              20x180
imagebatch_tenant_budget_usd{tenant="acme",period="day"}                                             100x180
imagebatch_batch_queue_tokens_reserved{model="gpt-image-2"}                                          1000x180
imagebatch_batch_queue_tokens_limit{model="gpt-image-2"}                                             90000x180
imagebatch_sync_requests_total{status="succeeded"}                                                   0+1x180
imagebatch_budget_wait_seconds_bucket{le="60"}                                                       0+1x180
imagebatch_budget_wait_seconds_bucket{le="+Inf"}                                                     0+2x180
imagebatch_budget_wait_seconds_sum                                                                   0+90x180
imagebatch_budget_wait_seconds_count                                                                 0+2x180
imagebatch_budget_oldest_wait_seconds                                                                120x180
imagebatch_model_shutdown_timestamp_seconds{model="gpt-image-1.5"}                                   5184000x180
imagebatch_job_eta_timestamp_seconds{job_id="job-1",tenant="acme",quantile="0.9"}                    7200x180
imagebatch_job_deadline_timestamp_seconds{job_id="job-1",tenant="acme",on_deadline="sync"}          5400x180
"""
SYNTHETIC_SERIES: list[tuple[str, str]] = [
    (series, values)
    for series, values in (line.rsplit(maxsplit=1) for line in _SYNTHETIC.strip().splitlines())
]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries_of(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
        for p in panels_of(dashboard)
        for t in p.get("targets", [])
    ]


def expand(expr: str) -> str:
    # Longest names first, so $__rate_interval is not read as $__r…
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def scraped(series: str) -> str:
    """``series`` with the labels Prometheus adds when it scrapes the API."""
    name, _, labels = series.partition("{")
    labels = labels.removesuffix("}")
    return f"{name}{{{_TARGET}{',' + labels if labels else ''}}}"


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "imagebatch"
    assert dashboard["title"] == "imagebatch"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["editable"] is False  # provisioned: changes belong in the JSON


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = panels_of(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['id']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_every_required_view_has_a_panel(dashboard: dict[str, Any]) -> None:
    titles = [p["title"].lower() for p in panels_of(dashboard) if p["type"] != "row"]
    for view, pattern in REQUIRED_PANELS.items():
        assert any(re.search(pattern, t) for t in titles), f"no panel shows {view}"


def test_every_panel_queries_the_provisioned_data_source(dashboard: dict[str, Any]) -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    for p in panels_of(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": source["uid"]}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p.get("description"), f"panel {p['title']!r} has no description"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]


def test_queries_select_only_series_the_service_exposes(dashboard: dict[str, Any]) -> None:
    for where, expr in queries_of(dashboard):
        assert metric_refs(expr), f"{where} selects no imagebatch series"
        assert not unknown_refs(expr), f"{where}: {unknown_refs(expr)}"
    known = series_names()
    for variable in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert m, variable["name"]
        assert m.group(2) in known[m.group(1)], variable["name"]


def test_synthetic_series_cover_every_metric() -> None:
    selected = {metric_refs(series)[0][0] for series, _ in SYNTHETIC_SERIES}
    assert selected == set(series_names()), "give every metric a synthetic series"


def test_every_panel_parses_and_shows_data(
    dashboard: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    queries = queries_of(dashboard)
    records = {
        f"dashboard_query_{i}": (where, expand(expr)) for i, (where, expr) in enumerate(queries)
    }
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": name, "expr": expr} for name, (_, expr) in records.items()],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    run_promtool(promtool, "check", "rules", tmp_path / "dashboard.rules.yml")
    series = [{"series": scraped(s), "values": v} for s, v in SYNTHETIC_SERIES]
    tests = {
        "rule_files": ["dashboard.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                # absent() is empty exactly when the query returned at least one series.
                "promql_expr_test": [
                    {"expr": f"absent({name})", "eval_time": "2h", "exp_samples": []}
                    for name in records
                ],
            }
        ],
    }
    (tmp_path / "dashboard.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    try:
        run_promtool(promtool, "test", "rules", "dashboard.test.yml", cwd=tmp_path)
    except AssertionError as exc:
        empty = [records[n][0] for n in records if f'absent({n})"' in str(exc)]
        raise AssertionError(f"panels showing no data: {empty}\n{exc}") from None


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(PROVIDERS)["providers"]
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in grafana["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/imagebatch.json"
