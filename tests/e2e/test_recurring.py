"""Recurring catalog runs end to end on real processes: result reuse across runs, retry in
place, and cron schedules (two beats at once; the stack stopped across a slot)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import pytest
from PIL import Image

from service.catalog import cached_catalog
from service.schedules.runner import slot_job_id
from tests.support.procs import Proc, redis_server_binary, start_redis, start_server, wait_until
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

TEMPLATE = "Studio photo of a {color} {title} on white"


def catalog_csv(rows: list[tuple[str, str, str]]) -> bytes:
    return ("sku,color,title\n" + "".join(f"{s},{c},{t}\n" for s, c, t in rows)).encode()


def submit_csv(stack: Stack, body: bytes, **params: str) -> dict[str, Any]:
    with stack.client() as c:
        resp = c.post(
            "/v1/jobs",
            content=body,
            params={"template": TEMPLATE, "quality": "low", **params},
            headers={"Content-Type": "text/csv"},
        )
    assert resp.status_code == 202, resp.text
    return resp.json()  # type: ignore[no-any-return]


def billed(sim: Any) -> int:
    return int(sim.stats()["batch"]["images"])


def batch_tokens(sim: Any, job: dict[str, Any]) -> Counter:
    stats = sim.stats()["batches"]
    total: Counter = Counter()
    for b in job["upstream_batches"]:
        if b["batch_id"]:
            total.update(stats[b["batch_id"]]["tokens"])
    return total


def test_a_changed_catalog_rerun_bills_only_changed_and_new_rows(
    make_simulator, make_stack
) -> None:
    sim = make_simulator()
    stack = make_stack(sim).start()
    rows = [(f"sku-{i}", "red", f"mug {i}") for i in range(200)]
    first = stack.wait_job(submit_csv(stack, catalog_csv(rows))["id"], timeout=180)
    assert first["status"] == "succeeded", stack.logs()
    assert billed(sim) == 200

    # Next week: 20 rows changed colour, 10 new SKUs.
    rows2 = [(s, "blue" if i % 10 == 0 else c, t) for i, (s, c, t) in enumerate(rows)]
    rows2 += [(f"sku-new-{i}", "green", f"cup {i}") for i in range(10)]
    body2 = catalog_csv(rows2)
    with stack.client() as c:
        est = c.post(
            "/v1/jobs/estimate",
            content=body2,
            params={"template": TEMPLATE, "quality": "low"},
            headers={"Content-Type": "text/csv"},
        ).json()
    assert est["reuse"] == {"items": 180, "images": 180, "unchecked_edits": 0}
    assert est["items"] == 30
    second = stack.wait_job(submit_csv(stack, body2)["id"], timeout=180)
    assert second["status"] == "succeeded", stack.logs()
    assert billed(sim) == 230  # exactly the 30 changed and new items
    assert second["counts"]["succeeded"] == 210 and second["counts"]["reused"] == 180
    assert second["images_stored"] == 210

    manifest = stack.manifest(second["id"])
    reused = [m for m in manifest if m.get("reused_from")]
    assert len(manifest) == 210 and len(reused) == 180
    assert all(m["reused_from"]["job_id"] == first["id"] for m in reused)
    assert all(m["cost_usd"] == 0 for m in reused)
    # Its cost is that of the 30 items upstream made for it, priced from their usage.
    tokens = batch_tokens(sim, second)
    price = cached_catalog().get("gpt-image-2").price
    expected = 0.5 * sum(tokens[k] * getattr(price, k) for k in tokens) / 1e6
    assert second["cost_usd"]["total"] == pytest.approx(expected, rel=1e-9)
    assert sum(m["cost_usd"] for m in manifest) == pytest.approx(expected, rel=1e-9)
    images = sorted((stack.tmp / "storage" / "jobs" / second["id"] / "images").iterdir())
    assert len(images) == 210
    for path in images:
        with Image.open(path) as img:
            assert img.size == (1024, 1024)

    metrics = httpx2.get(f"{stack.api}/metrics").text
    assert 'imagebatch_items_reused_total{model="gpt-image-2",tenant="default"} 180.0' in metrics
    assert "imagebatch_reuse_saved_usd_total" in metrics

    never = stack.wait_job(submit_csv(stack, body2, reuse="never")["id"], timeout=180)
    assert never["status"] == "succeeded" and never["counts"]["reused"] == 0
    assert billed(sim) == 230 + 210


def test_moderated_items_retried_with_rewritten_prompts(make_simulator, make_stack) -> None:
    sim = make_simulator(moderation_words="forbidden")
    stack = make_stack(sim).start()
    body = job_body(10)
    for i in (3, 7):
        body["items"][i]["prompt"] = f"A forbidden scene {i}"
    job = stack.wait_job(stack.submit(body)["id"])
    assert job["status"] == "partially_failed" and job["counts"]["failed"] == 2
    before = billed(sim)
    retry = {
        "items": [
            {"id": "sku-3", "prompt": "A calm studio scene 3"},
            {"id": "sku-7", "prompt": "A calm studio scene 7"},
        ]
    }
    with stack.client() as c:
        resp = c.post(f"/v1/jobs/{job['id']}/retry", json=retry, headers={"Idempotency-Key": "r1"})
        assert resp.status_code == 202, resp.text
        assert resp.json()["retried"] == 2
        again = c.post(f"/v1/jobs/{job['id']}/retry", json=retry, headers={"Idempotency-Key": "r1"})
        assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    done = stack.wait_job(job["id"])
    assert done["status"] == "succeeded", stack.logs()
    assert billed(sim) - before == 2
    manifest = stack.manifest(job["id"])
    assert len(manifest) == 10 and {m["status"] for m in manifest} == {"succeeded"}
    assert done["counts"]["succeeded"] == 10 and done["retries"] == 1
    with stack.client() as c:
        running = c.post(f"/v1/jobs/{job['id']}/retry", json={})
    assert running.status_code == 409  # nothing failed any more


def _schedule(stack: Stack, **extra: Any) -> dict[str, Any]:
    body = {"name": "every minute", "cron": "* * * * *", "job": job_body(2), **extra}
    with stack.client() as c:
        resp = c.post("/v1/schedules", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _runs(stack: Stack, schedule_id: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        return c.get("/v1/jobs", params={"schedule": schedule_id}).json()["data"]  # type: ignore[no-any-return]


def _ticks(stack: Stack) -> int:
    import redis

    return int(
        redis.Redis.from_url(stack.env["IMAGEBATCH_REDIS_URL"]).get("ib:schedules:ticks") or 0
    )


FAST_TICKS = {"IMAGEBATCH_SCHEDULE_TICK_SECONDS": "2", "IMAGEBATCH_SCHEDULE_LATE_SECONDS": "5"}


def test_every_minute_with_two_beats_makes_one_job_per_slot(make_simulator, make_stack) -> None:
    stack = make_stack(make_simulator(), env=FAST_TICKS)
    stack.start_api()
    stack.start_worker(name="a")
    stack.start_worker(name="b")
    stack.start_beat()
    # A second beat, as a mistaken deployment runs one (its own schedule file).
    env = {**stack.env, "IMAGEBATCH_DATA_DIR": str(stack.tmp / "data2")}
    stack.procs["beat2"] = Proc(stack._exe("beat"), stack.tmp / "beat2.log", env=env)
    schedule = _schedule(stack, labels={"campaign": "daily"})
    first = wait_until(
        lambda: _runs(stack, schedule["id"]), timeout=75, interval=1, message="the first run"
    )
    slot = schedule["next_run_at"]
    (job,) = first
    assert job["labels"] == {"campaign": "daily", "schedule": schedule["id"]}
    # Both beats keep ticking: several more ticks, still one job for that slot.
    seen = _ticks(stack)
    wait_until(lambda: _ticks(stack) >= seen + 6, timeout=30, message="six more ticks")
    runs = _runs(stack, schedule["id"])
    assert len([r for r in runs if r["id"] == job["id"]]) == 1
    assert len(runs) == 1 or runs[0]["created_at"] > slot  # a later slot may have begun
    done = stack.wait_job(job["id"])
    assert done["status"] == "succeeded"
    with stack.client() as c:
        view = c.get(f"/v1/schedules/{schedule['id']}").json()
    assert view["last_run"]["job_id"] in {r["id"] for r in _runs(stack, schedule["id"])}
    assert view["next_run_at"] > slot


def test_stack_stopped_across_a_slot_catch_up_one_runs_it_once(
    make_simulator, make_stack, tmp_path: Path
) -> None:
    redis_proc, url = start_redis(tmp_path / "own-redis")
    redis_proc.stop()
    port = url.rsplit(":", 1)[1].split("/")[0]

    def redis_up() -> Any:  # with its append-only file, as `imagebatch up` runs it
        return start_server(
            [
                redis_server_binary(),
                *("--port", port, "--bind", "127.0.0.1", "--appendonly", "yes"),
                *("--appendfsync", "always", "--save", "", "--dir", str(tmp_path / "own-redis")),
            ],
            int(port),
            tmp_path / "own-redis" / "redis.log",
        )

    rproc = redis_up()
    stack = make_stack(make_simulator(), redis_url=url, env=FAST_TICKS).start()
    try:
        if time.time() % 60 > 45:  # leave time to stop before the next slot
            wait_until(lambda: time.time() % 60 < 5, timeout=20, interval=0.5)
        one = _schedule(stack, catch_up="one")
        none = _schedule(stack, catch_up="none")
        slot = one["next_run_at"]
        for name in list(stack.procs):
            stack.kill(name)
        rproc.stop()
        missed = wait_until(
            lambda: (t := _slot_ts(slot)) and time.time() > t + 8 and t,
            timeout=80,
            interval=0.5,
            message="the slot to pass while everything is down",
        )
        rproc = redis_up()
        stack.start()
        wait_until(lambda: _runs(stack, one["id"]), timeout=30, message="the caught-up run")
        (run,) = _runs(stack, one["id"])
        assert run["id"] == slot_job_id(one["id"], missed)
        assert all(r["id"] != slot_job_id(none["id"], missed) for r in _runs(stack, none["id"]))
        with stack.client() as c:
            skipped = c.get(f"/v1/schedules/{none['id']}").json()
        assert "catch_up: none" in skipped["last_run"]["error"]
        assert skipped["next_run_at"] > slot
    finally:
        stack.stop()
        rproc.stop()


def _slot_ts(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
