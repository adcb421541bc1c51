"""The series deploy/ relies on are the ones the service exposes.

The rules and the dashboard are checked against :data:`tests.deploy.conftest.METRICS`; this
checks that list against the API's real collector (service/metrics.py) over a real Redis, so a
renamed or dropped metric fails here instead of leaving an alert silent in production.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from service import metrics
from service.context import build_context
from service.settings import Settings
from tests.deploy.conftest import DEPLOY, METRICS


def exposed_families(registry: CollectorRegistry) -> dict[str, str]:
    """Series name (counters with their ``_total``) -> type, as /metrics would expose them."""
    families = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = family.type
    return families


def test_every_metric_deploy_uses_is_exposed_with_its_type(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        data_dir=tmp_path,
        # With tenants (and caps) the budget gauges have something to report.
        tenants_file=DEPLOY / "tenants.example.toml",
    )
    ctx = build_context(settings)
    try:
        exposed = exposed_families(metrics.registry(ctx.redis, ctx.settings, ctx.budgets.gauges))
    finally:
        ctx.redis.close()
    missing = {name for name in METRICS if name not in exposed}
    assert not missing, f"deploy/ uses metrics the service does not expose: {sorted(missing)}"
    wrong = {name: exposed[name] for name, (kind, _) in METRICS.items() if exposed[name] != kind}
    assert not wrong, f"metrics exposed with another type than deploy/ expects: {wrong}"


def test_tenant_budget_gauges_report_the_caps_of_the_tenants_file(
    redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        data_dir=tmp_path,
        tenants_file=DEPLOY / "tenants.example.toml",
    )
    ctx = build_context(settings)
    try:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry(ctx.redis, ctx.settings, ctx.budgets.gauges).collect()
            if family.name == "imagebatch_tenant_budget_usd"
            for s in family.samples
        }
    finally:
        ctx.redis.close()
    # The alerts divide spend by these; a tenant without a cap has no series (no alert).
    assert samples == {
        ("imagebatch_tenant_budget_usd", (("period", "day"), ("tenant", "catalog-team"))): 50.0,
        ("imagebatch_tenant_budget_usd", (("period", "month"), ("tenant", "catalog-team"))): 1000.0,
        ("imagebatch_tenant_budget_usd", (("period", "month"), ("tenant", "marketing"))): 300.0,
    }
