"""Spend, exactly: what /metrics reports per job equals what the simulator billed, and a real
Prometheus server reads it back with PromQL."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.catalog import cached_catalog
from tests.support.procs import free_port, start_server, wait_until
from tests.support.stack import job_body

pytestmark = pytest.mark.slow

KINDS = ("text_input", "image_input", "image_output", "text_output")


def scrape(api: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(httpx2.get(f"{api}/metrics").text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def billed_for(sim_stats: dict, batch_ids: list[str]) -> Counter:
    total: Counter = Counter()
    for bid in batch_ids:
        total.update(sim_stats["batches"][bid]["tokens"])
    return total


def test_per_job_tokens_and_cost_equal_what_upstream_billed(make_simulator, make_stack):
    sim = make_simulator()
    stack = make_stack(sim, env={"IMAGEBATCH_BATCH_MAX_LINES": "40"})
    stack.start_api()
    stack.start_worker(name="a")
    stack.start_worker(name="b")
    stack.start_beat()
    body = job_body(120, labels={"campaign": "spring-sale"})
    for i, item in enumerate(body["items"]):
        item["quality"] = ("low", "medium", "high")[i % 3]
    accepted = stack.submit(body)
    job = stack.wait_job(accepted["id"], timeout=120)
    assert job["status"] == "succeeded", stack.logs()
    batch_ids = [b["batch_id"] for b in job["upstream_batches"] if b["batch_id"]]
    assert len(batch_ids) >= 3
    billed = billed_for(sim.stats(), batch_ids)

    metrics = scrape(stack.api)
    mine = {
        s[0]["kind"]: s[1]
        for s in metrics["imagebatch_job_tokens_total"]
        if s[0]["job_id"] == job["id"]
    }
    for kind in ("text_input", "image_input", "image_output"):
        assert mine[kind] == billed.get(kind, 0), kind
    assert job["tokens"]["image_output"] == billed["image_output"]

    price = cached_catalog().get("gpt-image-2").price
    expected_usd = (
        0.5
        * (
            billed["text_input"] * price.text_input
            + billed["image_input"] * price.image_input
            + billed["image_output"] * price.image_output
        )
        / 1e6
    )
    cost = {
        s[0]["tier"]: s[1]
        for s in metrics["imagebatch_job_cost_usd_total"]
        if s[0]["job_id"] == job["id"]
    }
    assert cost["batch"] == pytest.approx(expected_usd, rel=1e-9)
    assert cost["sync"] == 0
    campaign = [
        v
        for labels, v in metrics["imagebatch_cost_usd_total"]
        if labels["campaign"] == "spring-sale"
    ]
    assert sum(campaign) == pytest.approx(expected_usd, rel=1e-9)

    # Every upstream call is counted by endpoint (ids folded, so labels stay bounded) and status.
    requests = {
        (labels["endpoint"], labels["status"]): v
        for labels, v in metrics["imagebatch_upstream_requests_total"]
    }
    assert requests[("/v1/batches", "200")] >= len(batch_ids)
    assert requests[("/v1/files/{id}/content", "200")] >= len(batch_ids)
    assert not any("batch_" in endpoint or "file-" in endpoint for endpoint, _ in requests)

    # The estimate before the run is within 2 % of what was billed.
    est = accepted["estimate"]["tokens"]
    est_total = sum(est.values())
    assert abs(est_total - sum(billed.values())) <= 0.02 * sum(billed.values())


@pytest.mark.skipif(
    not shutil.which("prometheus") and not os.environ.get("CI"),
    reason="Debian's prometheus package is not installed",
)
def test_prometheus_scrapes_the_stack_and_promql_reads_job_spend(
    make_simulator, make_stack, tmp_path: Path
):
    assert shutil.which("prometheus"), (
        "prometheus is required under CI; install Debian's prometheus package"
    )
    sim = make_simulator()
    stack = make_stack(sim).start()
    job = stack.wait_job(stack.submit(job_body(30))["id"])
    assert job["status"] == "succeeded"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: imagebatch
    static_configs: [{{targets: ['127.0.0.1:{stack.api_port}']}}]
""")
    prom = start_server(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        port,
        tmp_path / "prometheus.log",
    )
    try:

        def query() -> float | None:
            resp = httpx2.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": "sum by (job_id) (imagebatch_job_tokens_total)"},
            ).json()
            for r in resp["data"]["result"]:
                if r["metric"].get("job_id") == job["id"]:
                    return float(r["value"][1])
            return None

        value = wait_until(
            query, timeout=60, interval=0.5, message="Prometheus to scrape the job's tokens"
        )
        assert value == sum(job["tokens"].values())
    finally:
        prom.stop()


def test_idle_workers_report_a_heartbeat(make_simulator, make_stack):
    sim = make_simulator()
    stack = make_stack(sim)
    stack.start_api()
    stack.start_worker("control", name="idle-a")
    stack.start_worker("collect", name="idle-b")

    def beats() -> list[float]:
        return [
            v for _, v in scrape(stack.api).get("imagebatch_worker_heartbeat_timestamp_seconds", [])
        ]

    # No task has run: both workers still say they are alive.
    found = wait_until(
        lambda: len(b := beats()) >= 2 and b, timeout=30, message="both workers' heartbeats"
    )
    assert all(v > 0 for v in found)
