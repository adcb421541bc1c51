"""Deadlines end to end: the whole stack against a simulator whose batches are too slow.

With ``on_deadline: sync`` the job leaves the batch lane when the clock comes within the margin
of its deadline: its batches are cancelled, what they finished is collected and kept, and only
the rest goes through the sync lane; it ends ``succeeded`` before the deadline, every image
stored once and made once (the simulator billed exactly as many images as there are items), its
spend equal to what the simulator billed, and its lanes report right. With ``cancel`` it ends
``cancelled`` at its deadline with the images its batches finished.

Deadlines are set relative to the clock when the test runs (never a fixed date).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from service.catalog import cached_catalog
from service.pricing import Tokens, cost_nanousd
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

MODEL = "gpt-image-2"
KINDS = ("text_input", "image_input", "image_output", "text_output")


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stored_images(stack: Stack, job_id: str) -> list[Path]:
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    return sorted(p for p in root.glob("*") if not p.name.endswith(".meta.json"))


def billed(sim_stats: dict[str, Any], batch_ids: list[str]) -> tuple[Counter, Counter]:
    """Tokens the simulator billed for the job's batches, and for sync requests."""
    batch: Counter = Counter()
    for bid in batch_ids:
        batch.update(sim_stats["batches"][bid]["tokens"])
    return batch, Counter(sim_stats["sync"]["tokens"])


def usd(tokens: Counter, tier: str) -> float:
    catalog = cached_catalog(None)
    model = catalog.get(MODEL)
    assert model is not None
    counts = Tokens(**{k: tokens.get(k, 0) for k in KINDS})
    return cost_nanousd(counts, model, catalog, tier) / 1e9


def start(stack: Stack) -> Stack:
    stack.start_api()
    stack.start_worker(name="a")
    stack.start_beat()
    return stack


def test_a_job_too_slow_for_its_deadline_finishes_on_the_sync_lane(make_simulator, make_stack):
    # Each batch makes an image every ~6.7 s: three batches of four lines need ~27 s; the job
    # has 25 s, and leaves the batch lane when 12 s are left (its margin).
    sim = make_simulator(rate=0.15)
    stack = start(
        make_stack(
            sim,
            env={
                "IMAGEBATCH_BATCH_MAX_LINES": "4",
                "IMAGEBATCH_DEADLINE_MARGIN_SECONDS": "12",
            },
        )
    )
    deadline = time.time() + 25
    body = job_body(12, deadline=rfc3339(deadline), on_deadline="sync", max_cost_usd=5)
    accepted = stack.submit(body)
    assert accepted["estimate"]["usd"]["worst_case"] == accepted["estimate"]["usd"]["sync"]
    assert accepted["estimate"]["usd"]["expected"] == accepted["estimate"]["usd"]["batch"]
    job = stack.wait_job(accepted["id"], timeout=90)
    assert job["status"] == "succeeded", stack.logs()
    assert parse_iso(job["finished_at"]) <= deadline
    assert job["counts"]["succeeded"] == 12

    # Every image stored once, and made once: the simulator billed one image per item.
    images = stored_images(stack, job["id"])
    assert len(images) == 12
    manifest = stack.manifest(job["id"])
    assert sorted(line["id"] for line in manifest) == sorted(i["id"] for i in body["items"])
    stats = sim.stats()
    assert stats["models"][MODEL]["images"] == 12

    # The lanes report: both lanes ran, and each lane's items and money are what was billed.
    lanes = job["lanes"]
    assert lanes["sync"]["reason"] == "deadline"
    batch_ids = [b["batch_id"] for b in job["upstream_batches"] if b["batch_id"]]
    batch_tokens, sync_tokens = billed(stats, batch_ids)
    batch_lines = sum(stats["batches"][bid]["lines_completed"] for bid in batch_ids)
    assert lanes["batch"]["items"] == batch_lines
    assert lanes["sync"]["items"] == stats["sync"]["images"]
    assert lanes["batch"]["items"] + lanes["sync"]["items"] == 12
    assert lanes["sync"]["items"] > 0
    assert sum(1 for line in manifest if line["tier"] == "sync") == lanes["sync"]["items"]
    for kind in KINDS:
        assert job["tokens"][kind] == batch_tokens[kind] + sync_tokens[kind], kind
    assert lanes["batch"]["usd"] == pytest.approx(usd(batch_tokens, "batch"), abs=1e-6)
    assert lanes["sync"]["usd"] == pytest.approx(usd(sync_tokens, "sync"), abs=1e-6)
    assert job["cost_usd"]["total"] == pytest.approx(
        lanes["batch"]["usd"] + lanes["sync"]["usd"], abs=1e-9
    )
    assert job["cost_usd"]["total"] <= 5


def test_a_job_set_to_cancel_stops_at_its_deadline_with_its_finished_images(
    make_simulator, make_stack
):
    # An image every 5 s per batch: two batches of four lines need 20 s; the deadline is 16 s.
    sim = make_simulator(rate=0.2)
    stack = start(make_stack(sim, env={"IMAGEBATCH_BATCH_MAX_LINES": "4"}))
    deadline = time.time() + 16
    body = job_body(8, deadline=rfc3339(deadline), on_deadline="cancel")
    accepted = stack.submit(body)
    job = stack.wait_job(accepted["id"], timeout=60)
    assert job["status"] == "cancelled", stack.logs()
    assert job["reason"] == "cancelled at its deadline"
    finished = parse_iso(job["finished_at"])
    assert deadline <= finished <= deadline + 30
    counts = job["counts"]
    assert 0 < counts["succeeded"] < 8
    assert counts["succeeded"] + counts["cancelled"] == 8
    # The finished images are kept, each once, and they are all the simulator made.
    assert len(stored_images(stack, job["id"])) == counts["succeeded"]
    assert sim.stats()["models"][MODEL]["images"] == counts["succeeded"]
    assert job["lanes"]["batch"]["items"] == counts["succeeded"]
    assert job["lanes"]["sync"] == {"items": 0, "usd": 0.0, "reason": None}
