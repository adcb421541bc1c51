"""Keeping up with OpenAI, end to end: batch webhooks instead of waiting for the poll, and a model
whose batch support upstream withdrew. The whole stack as real processes (API, Celery workers,
beat, Redis, local storage) against the simulator over HTTP.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from simulator.webhooks import sign
from tests.support.catalog import catalog_variant
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle
from tests.support.stack import Stack, job_body

SUNBURST = "gpt-image-2.6-sunburst"


def metric(stack: Stack, name: str, labels: str = "") -> float:
    """One series of the API's /metrics (0 when absent)."""
    text = httpx2.get(f"{stack.api}/metrics", timeout=30).text
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def delivery(
    secret: str, batch_id: str, *, webhook_id: str | None = None, at: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A batch.completed event signed as OpenAI signs it."""
    body = orjson.dumps(
        {
            "id": f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": "batch.completed",
            "created_at": int(time.time()),
            "data": {"id": batch_id},
        }
    )
    webhook_id = webhook_id or f"wh_{secrets.token_hex(8)}"
    ts = at or int(time.time())
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, webhook_id, ts, body),
        "content-type": "application/json",
    }
    return body, headers


def test_webhooks_finish_a_job_long_before_the_poll_and_forgeries_change_nothing(
    tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    sim = SimulatorHandle(
        tmp_path / "sim",
        {"rate": 2000, "validate_seconds": 0, "finalize_seconds": 0, "webhook_secret": secret},
    )
    stack = make_stack(sim, env={"IMAGEBATCH_POLL_SECONDS": "60", "OPENAI_WEBHOOK_SECRET": secret})
    sim.flags["webhook_url"] = f"{stack.api}/v1/webhooks/openai"
    sim.start()
    try:
        stack.start()
        wait_until(lambda: "beat: Starting" in stack.logs(), timeout=60, message="beat")
        submitted = time.monotonic()
        job = stack.submit(job_body(100))
        done = stack.wait_job(job["id"], timeout=15)
        took = time.monotonic() - submitted
        assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 100, done
        assert took < 15
        assert metric(stack, "imagebatch_openai_webhooks_verified_total") >= 1
        assert sim.stats()["webhooks"]["delivered"] >= 1
        batch_id = done["upstream_batches"][0]["batch_id"]

        polls = 'endpoint="/v1/batches/{id}",status="200"'
        before = (
            metric(stack, "imagebatch_upstream_requests_total", polls),
            metric(stack, "imagebatch_openai_webhooks_duplicate_total"),
        )
        forged = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        body, headers = delivery(forged, batch_id)
        with stack.client() as c:
            resp = c.post("/v1/webhooks/openai", content=body, headers=headers)
            assert resp.status_code == 400, resp.text
            assert resp.headers["content-type"].startswith("application/problem+json")
            # Right secret, but ten minutes old: a replay outside the window.
            stale_body, stale = delivery(secret, batch_id, at=int(time.time()) - 600)
            assert (
                c.post("/v1/webhooks/openai", content=stale_body, headers=stale).status_code == 400
            )
            # A tampered body under a genuine signature.
            tampered = body.replace(batch_id.encode(), b"batch_other")
            _, genuine = delivery(secret, batch_id)
            assert (
                c.post("/v1/webhooks/openai", content=tampered, headers=genuine).status_code == 400
            )
            # A genuine delivery is taken once; the same delivery again is refused.
            body, headers = delivery(secret, batch_id)
            first = c.post("/v1/webhooks/openai", content=body, headers=headers)
            assert first.status_code == 200 and first.json()["batch_id"] == batch_id
            replay = c.post("/v1/webhooks/openai", content=body, headers=headers)
            assert replay.status_code == 400 and "received before" in replay.json()["detail"]
            # A batch that is not ours (another app in the project): acknowledged, ignored.
            body, headers = delivery(secret, "batch_not_ours")
            other = c.post("/v1/webhooks/openai", content=body, headers=headers)
            assert other.status_code == 200 and other.json()["status"] == "unknown"
        # Nothing was polled upstream for any of them, and the job is as it was.
        wait_until(
            lambda: metric(stack, "imagebatch_queue_depth", 'queue="control"') == 0,
            timeout=15,
            message="the control queue to drain",
        )
        assert metric(stack, "imagebatch_upstream_requests_total", polls) == before[0]
        assert metric(stack, "imagebatch_openai_webhooks_duplicate_total") == before[1] + 1
        assert metric(stack, "imagebatch_openai_webhooks_rejected_total", 'reason="signature"') >= 3
        again = stack.job(job["id"])
        assert again["status"] == "succeeded" and again["counts"] == done["counts"]
    finally:
        sim.stop()


@pytest.fixture
def batch_refusing(
    tmp_path: Path,
    make_simulator: Callable[..., SimulatorHandle],
    make_stack: Callable[..., Stack],
) -> tuple[SimulatorHandle, Stack]:
    # A catalog that claims batch support for sunburst; upstream (the simulator) refuses it.
    catalog = catalog_variant(tmp_path, "batchable.toml", batch={SUNBURST: True})
    sim = make_simulator(catalog_file=catalog, batch_unsupported=SUNBURST)
    stack = make_stack(sim, env={"IMAGEBATCH_CATALOG_FILE": str(catalog)}).start()
    return sim, stack


def body_for(n: int, mode: str, prefix: str) -> dict[str, Any]:
    # The jobs share prompts; reuse would complete later ones from the first one's images.
    return {**job_body(n, prefix=prefix), "model": SUNBURST, "mode": mode, "reuse": "never"}


def test_a_model_upstream_will_not_batch_runs_on_the_sync_lane(
    batch_refusing: tuple[SimulatorHandle, Stack],
) -> None:
    sim, stack = batch_refusing
    first = stack.submit(body_for(50, "auto", "a"))
    assert first["mode"] == "batch"  # the catalog's word, until upstream says otherwise
    done = stack.wait_job(first["id"], timeout=120)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 50, done
    assert done["mode"] == "sync" and done["cost_usd"]["sync"] > 0
    batches = sim.stats()["batches"]
    assert [b["status"] for b in batches.values()] == ["failed"]
    assert sim.stats()["sync"]["images"] == 50
    listed = httpx2.get(f"{stack.api}/v1/models/{SUNBURST}", timeout=30).json()
    assert listed["batch"]["configured"] is True and listed["batch"]["supported"] is False
    assert listed["batch"]["learned"]["batch_id"] in batches

    # Learned: the next auto job goes straight to the sync lane; no upstream batch is made.
    second = stack.submit(body_for(50, "auto", "b"))
    assert second["mode"] == "sync"
    assert stack.wait_job(second["id"], timeout=120)["status"] == "succeeded"
    assert len(sim.stats()["batches"]) == 1

    # A batch job is taken, with a warning, and its items fail naming the model.
    third = stack.submit(body_for(10, "batch", "c"))
    assert any("model_not_batch_capable" in w for w in third["warnings"])
    ended = stack.wait_job(third["id"], timeout=60)
    assert ended["status"] == "failed" and ended["counts"]["failed"] == 10
    errors = {line["error"]["code"] for line in stack.manifest(third["id"])}
    assert errors == {"model_not_batch_capable"}
    assert len(sim.stats()["batches"]) == 1
