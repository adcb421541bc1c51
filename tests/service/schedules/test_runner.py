"""The slot runner against a real Redis and local storage, with a fake clock (fixed dates, never
today's): exactly one job per slot however many runners tick at once, catch-up after downtime,
and schedules validated as intake validates jobs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.context import Context
from service.errors import Problem
from service.schedules import define, runner
from service.schedules.store import ScheduleStore
from tests.service.schedules.test_slots import ts
from tests.support.context import make_context
from tests.support.stack import job_body

T0 = ts(2031, 3, 10, 9, 0)  # a Monday, 09:00 UTC


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client: Any) -> Iterator[Context]:
    (tmp_path / "catalogs").mkdir()
    context = make_context(
        tmp_path, redis_url, local_ref_roots=[tmp_path / "catalogs"], schedule_late_seconds=60
    )
    yield context
    context.redis.close()


def every_hour(ctx: Context, **extra: Any) -> str:
    body = {"name": "hourly", "cron": "0 * * * *", "job": job_body(3), **extra}
    schedule = define.create(ctx, "default", body, now=T0 - 1800)
    ScheduleStore(ctx.redis).save(schedule)
    return schedule.id


def runs(ctx: Context, schedule_id: str) -> list[str]:
    return [j for j, _ in ScheduleStore(ctx.redis).runs(schedule_id, limit=100)]


def test_one_job_per_slot_however_many_runners_tick_at_once(ctx: Context) -> None:
    sid = every_hour(ctx, labels={"campaign": "spring"})
    store = ScheduleStore(ctx.redis)
    assert store.get(sid).next_run_at == T0
    assert runner.tick(ctx, now=T0 - 1)["created"] == 0
    barrier = threading.Barrier(6)

    def tick() -> None:
        barrier.wait()
        runner.tick(ctx, now=T0 + 3)

    threads = [threading.Thread(target=tick) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (job_id,) = runs(ctx, sid)
    assert job_id == runner.slot_job_id(sid, T0)
    job = ctx.store.job(job_id)
    assert job.labels == {"campaign": "spring", "schedule": sid} and job.items == 3
    assert store.get(sid).next_run_at == T0 + 3600
    assert store.get(sid).last_job_id == job_id
    # The same slot again (a tick that read the schedule before it moved on): nothing new.
    runner.handle(ctx, store, sid, T0 + 5)
    assert runs(ctx, sid) == [job_id]
    runner.tick(ctx, now=T0 + 3600 + 2)
    assert len(runs(ctx, sid)) == 2


def test_a_job_made_by_a_runner_that_died_before_moving_on_is_not_made_again(
    ctx: Context,
) -> None:
    sid = every_hour(ctx)
    schedule = ScheduleStore(ctx.redis).get(sid)
    runner.make_job(ctx, schedule, runner.slot_job_id(sid, T0))  # made; then the runner died
    runner.tick(ctx, now=T0 + 10)
    assert runs(ctx, sid) == [runner.slot_job_id(sid, T0)]
    assert len(ctx.store.list_jobs("default")) == 1


def test_catch_up_one_runs_the_latest_missed_slot_once_and_none_skips(ctx: Context) -> None:
    one = every_hour(ctx, catch_up="one")
    none = every_hour(ctx, catch_up="none")
    # Down from before 09:00 until 11:20: slots 09:00, 10:00 and 11:00 were missed.
    back = T0 + 2 * 3600 + 1200
    runner.tick(ctx, now=back)
    runner.tick(ctx, now=back + 5)
    assert runs(ctx, one) == [runner.slot_job_id(one, T0 + 7200)]
    assert runs(ctx, none) == []
    store = ScheduleStore(ctx.redis)
    for sid in (one, none):
        assert store.get(sid).next_run_at == T0 + 3 * 3600
    assert "catch_up: none" in (store.get(none).last_error or "")
    runner.tick(ctx, now=T0 + 3 * 3600 + 1)  # back to normal: both run 12:00
    assert len(runs(ctx, one)) == 2 and len(runs(ctx, none)) == 1


def test_a_paused_schedule_makes_nothing_and_resumes_from_now(ctx: Context) -> None:
    sid = every_hour(ctx)
    store = ScheduleStore(ctx.redis)
    paused = define.patch(ctx, store.get(sid), {"enabled": False}, now=T0 - 60)
    store.save(paused)
    assert paused.next_run_at is None
    runner.tick(ctx, now=T0 + 5 * 3600)
    assert runs(ctx, sid) == []
    resumed = define.patch(ctx, paused, {"enabled": True}, now=T0 + 5 * 3600 + 60)
    store.save(resumed)
    assert resumed.next_run_at == T0 + 6 * 3600


def test_a_catalog_schedule_reads_the_catalog_at_each_run(ctx: Context, tmp_path: Path) -> None:
    csv = tmp_path / "catalogs" / "products.csv"
    csv.write_text("sku,color,title\nsku-1,red,mug\nsku-2,blue,mug\n")
    schedule = define.create(
        ctx,
        "default",
        {
            "name": "catalog",
            "cron": "0 * * * *",
            "catalog_url": csv.as_uri(),
            "template": "Studio photo of a {color} {title}",
            "params": {"quality": "low", "id_column": "sku"},
            "max_cost_usd": 5,
        },
        now=T0 - 60,
    )
    ScheduleStore(ctx.redis).save(schedule)
    runner.tick(ctx, now=T0 + 1)
    csv.write_text("sku,color,title\nsku-1,red,mug\nsku-2,blue,mug\nsku-3,green,cup\n")
    runner.tick(ctx, now=T0 + 3601)
    first, second = (ctx.store.job(j) for j in reversed(runs(ctx, schedule.id)))
    assert (first.items, second.items) == (2, 3)
    assert second.max_cost_usd == 5 and second.labels == {"schedule": schedule.id}


def test_schedules_are_validated_like_jobs(ctx: Context, tmp_path: Path) -> None:
    with pytest.raises(Problem) as exc:
        define.create(
            ctx,
            "default",
            {
                "name": "",
                "cron": "61 * * * *",
                "timezone": "Mars/Olympus",
                "job": job_body(2),
                "catch_up": "all",
                "colour": 1,
            },
        )
    fields = {e.field for e in exc.value.errors}
    assert fields == {"name", "cron", "timezone", "catch_up", "colour"}
    bad_job = job_body(2)
    bad_job["items"][1]["size"] = "999x999"
    with pytest.raises(Problem) as exc:
        define.create(ctx, "default", {"name": "x", "cron": "0 6 * * *", "job": bad_job})
    (error,) = exc.value.errors
    assert (error.field, error.index, error.id) == ("job.items[1].size", 1, "sku-1")
    with pytest.raises(Problem) as exc:
        define.create(
            ctx,
            "default",
            {"name": "x", "cron": "0 6 * * *", "catalog_url": (tmp_path / "nope.csv").as_uri()},
        )
    assert exc.value.errors[0].field == "catalog_url"
