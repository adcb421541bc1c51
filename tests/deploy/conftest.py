"""Shared pieces of the deploy/ tests: paths, the metric contract, setting names, promtool.

The metric contract (:data:`METRICS`) is the list of series the service exposes that deploy/'s
rules and dashboard may use; ``test_metrics_contract`` checks it against the real collector.
promtool comes from Debian's ``prometheus`` package: missing, its tests skip locally and fail
under CI (``CI`` set), where ``.ci/run`` installs it.

Tests marked ``container`` build the image and run containers (minutes, not seconds): they are
deselected unless the run selects them with ``-m container`` (``make test-container``, its own CI
step), and the times they measured are printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
TENANTS_OVERLAY = DEPLOY / "compose.tenants.yml"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "imagebatch.rules.yml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "rules" / "imagebatch.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "imagebatch.json"
K8S = DEPLOY / "k8s"

# The services built from deploy/Dockerfile (one image, different commands).
IMAGEBATCH_SERVICES = ("api", "worker", "worker-sync", "worker-webhooks", "beat", "simulator")

# name -> (type, label names) of every series the service exposes (service/metrics.py).
# Histograms are listed by base name and appear as _bucket/_sum/_count.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "imagebatch_job_tokens_total": ("counter", ("job_id", "tenant", "model", "kind")),
    "imagebatch_job_cost_usd_total": ("counter", ("job_id", "tenant", "model", "tier")),
    "imagebatch_tokens_total": ("counter", ("tenant", "model", "kind", "tier")),
    "imagebatch_cost_usd_total": ("counter", ("tenant", "model", "tier", "campaign")),
    "imagebatch_images_total": ("counter", ("model", "status")),
    "imagebatch_jobs": ("gauge", ("status",)),
    "imagebatch_jobs_finished_total": ("counter", ("status",)),
    "imagebatch_items": ("gauge", ("state",)),
    "imagebatch_upstream_batches": ("gauge", ("status",)),
    "imagebatch_upstream_batch_oldest_age_seconds": ("gauge", ()),
    "imagebatch_upstream_completion_window_seconds": ("gauge", ()),
    "imagebatch_upstream_requests_total": ("counter", ("endpoint", "status")),
    "imagebatch_upstream_rate_limited_total": ("counter", ("endpoint",)),
    "imagebatch_task_duration_seconds": ("histogram", ("task",)),
    "imagebatch_collect_bytes_total": ("counter", ()),
    "imagebatch_queue_depth": ("gauge", ("queue",)),
    "imagebatch_worker_heartbeat_timestamp_seconds": ("gauge", ("worker",)),
    "imagebatch_tenant_spend_usd": ("gauge", ("tenant", "period")),
    "imagebatch_tenant_budget_usd": ("gauge", ("tenant", "period")),
    "imagebatch_batch_queue_tokens_reserved": ("gauge", ("model",)),
    "imagebatch_batch_queue_tokens_limit": ("gauge", ("model",)),
    "imagebatch_sync_requests_total": ("counter", ("status",)),
    "imagebatch_budget_wait_seconds": ("histogram", ()),
    "imagebatch_budget_oldest_wait_seconds": ("gauge", ()),
    "imagebatch_model_shutdown_timestamp_seconds": ("gauge", ("model",)),
    "imagebatch_job_eta_timestamp_seconds": ("gauge", ("job_id", "tenant", "quantile")),
    "imagebatch_job_deadline_timestamp_seconds": ("gauge", ("job_id", "tenant", "on_deadline")),
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = ("job", "instance")
OTHER_SERIES = {"up"}


def series_names() -> dict[str, tuple[str, ...]]:
    """Every series name a query may select, with its label names."""
    names: dict[str, tuple[str, ...]] = {}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            names[f"{name}_bucket"] = (*labels, "le")
            names[f"{name}_sum"] = labels
            names[f"{name}_count"] = labels
        else:
            names[name] = labels
    return names


# An imagebatch_* name not inside a recording rule's name (level:metric:operations).
_METRIC_REF = re.compile(r"(?<![\w:])(imagebatch_\w+)(?![\w:])(\s*\{([^}]*)\})?")
_RECORDED_REF = re.compile(r"(?<![\w:])([a-zA-Z_]\w*:\w+:\w+)")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def metric_refs(expr: str) -> list[tuple[str, list[str]]]:
    """(metric name, label names in its selector) for every imagebatch_* series in ``expr``."""
    return [
        (m.group(1), _MATCHER_LABEL.findall(m.group(3) or "")) for m in _METRIC_REF.finditer(expr)
    ]


def recorded_refs(expr: str) -> set[str]:
    return set(_RECORDED_REF.findall(expr))


def unknown_refs(expr: str) -> list[str]:
    """Problems with the series ``expr`` selects: unknown names, or labels they do not carry."""
    known = series_names()
    problems = []
    for name, labels in metric_refs(expr):
        if name not in known:
            problems.append(f"unknown metric {name}")
            continue
        for label in labels:
            if label not in known[name] and label not in TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    return problems


def setting_env_names() -> set[str]:
    """Environment variable names Settings reads: IMAGEBATCH_<FIELD> or a field's own aliases."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


# boto3's own environment variables (the S3 client reads them unchanged).
BOTO3_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
}


# (what, seconds) measured by the container tests, printed in the terminal summary.
TIMINGS: list[tuple[str, float]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container: builds the image and runs containers from it (make test-container); "
        "deselected unless -m selects it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "container" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("container")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("container")]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "container test timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{what:<58} {seconds:7.1f} s")


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_FILE.open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; skips locally when it is missing, fails under CI."""
    path = shutil.which("promtool")
    if path:
        return path
    if under_ci():
        pytest.fail(
            "promtool is required under CI; install Debian's prometheus package "
            "(apt-get install prometheus)"
        )
    pytest.skip("promtool not found: install Debian's prometheus package to run the rule tests")


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> str:
    """Run promtool; on failure the assertion shows its whole output."""
    proc = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output
