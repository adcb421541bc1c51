"""Schedules in Redis: every read and write of them goes through :class:`ScheduleStore`.

A schedule is a hash; a tenant's schedules are a sorted set (listing); enabled schedules sit in
one sorted set by their next run (what the runner scans); each schedule's runs are a sorted set
of job ids by slot, the newest :data:`RUNS_KEPT` kept. Redis keeps them as it keeps jobs, so
they survive a restart wherever Redis keeps its data (the embedded Redis writes an append-only
file).

Failure semantics: moving a schedule past a slot is compare-and-set on its ``next_run_at``
(:meth:`ScheduleStore.advance`), so two processes that handled the same slot cannot move it
twice, and a PATCH made meanwhile is not overwritten. Redis errors propagate.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import redis

from service.redis import keys
from service.schedules.model import Schedule

RUNS_KEPT = 1000


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class ScheduleStore:
    def __init__(self, client: redis.Redis):
        self.r = client

    def save(self, schedule: Schedule) -> None:
        """Create or replace a schedule, and file it where the runner and listings look."""
        pipe = self.r.pipeline()
        pipe.delete(keys.schedule(schedule.id))
        pipe.hset(keys.schedule(schedule.id), mapping=schedule.to_hash())
        pipe.zadd(keys.tenant_schedules(schedule.tenant), {schedule.id: schedule.created_at})
        if schedule.enabled and schedule.next_run_at is not None:
            pipe.zadd(keys.SCHEDULES_DUE, {schedule.id: schedule.next_run_at})
        else:
            pipe.zrem(keys.SCHEDULES_DUE, schedule.id)
        pipe.execute()

    def get(self, schedule_id: str) -> Schedule | None:
        raw = self.r.hgetall(keys.schedule(schedule_id))
        return Schedule.from_hash(_decode(raw)) if raw else None

    def for_tenant(self, tenant: str) -> list[Schedule]:
        ids = [i.decode() for i in self.r.zrange(keys.tenant_schedules(tenant), 0, -1)]
        out = []
        for schedule_id in ids:
            schedule = self.get(schedule_id)
            if schedule is not None:
                out.append(schedule)
        return out

    def delete(self, schedule: Schedule) -> None:
        pipe = self.r.pipeline()
        pipe.delete(keys.schedule(schedule.id), keys.schedule_runs(schedule.id))
        pipe.zrem(keys.tenant_schedules(schedule.tenant), schedule.id)
        pipe.zrem(keys.SCHEDULES_DUE, schedule.id)
        pipe.execute()

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Enabled schedules whose next run is at or before ``now``, the longest-waiting first."""
        return [
            m.decode()
            for m in self.r.zrangebyscore(keys.SCHEDULES_DUE, "-inf", now, start=0, num=limit)
        ]

    def undue(self, schedule_id: str) -> None:
        self.r.zrem(keys.SCHEDULES_DUE, schedule_id)

    def advance(
        self, schedule_id: str, expected: float, next_run_at: float | None, **fields: Any
    ) -> bool:
        """Move the schedule past the slot it waited for (``expected``), recording ``fields``;
        False when it had moved already (another process, or a PATCH)."""
        key = keys.schedule(schedule_id)
        mapping = {k: "" if v is None else str(v) for k, v in fields.items()}
        mapping["next_run_at"] = "" if next_run_at is None else repr(next_run_at)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.hget(key, "next_run_at")
                    if current is None or float(current or "nan") != expected:
                        pipe.reset()
                        return False
                    enabled = pipe.hget(key, "enabled") == b"1"
                    pipe.multi()
                    pipe.hset(key, mapping=mapping)
                    if next_run_at is not None and enabled:
                        pipe.zadd(keys.SCHEDULES_DUE, {schedule_id: next_run_at})
                    else:
                        pipe.zrem(keys.SCHEDULES_DUE, schedule_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def note_run(
        self, schedule_id: str, job_id: str | None, slot: float, error: str | None
    ) -> None:
        """Record a run made outside the slot sequence (``POST /run``) as the last run."""
        fields = {
            "last_slot": repr(slot),
            "last_run_at": repr(time.time()),
            "last_job_id": job_id or "",
            "last_error": error or "",
        }
        pipe = self.r.pipeline()
        if self.r.exists(keys.schedule(schedule_id)):
            pipe.hset(keys.schedule(schedule_id), mapping=fields)
        if job_id:
            self._add_run(pipe, schedule_id, job_id, slot)
        pipe.execute()

    def add_run(self, schedule_id: str, job_id: str, slot: float) -> None:
        pipe = self.r.pipeline()
        self._add_run(pipe, schedule_id, job_id, slot)
        pipe.execute()

    @staticmethod
    def _add_run(pipe: Any, schedule_id: str, job_id: str, slot: float) -> None:
        pipe.zadd(keys.schedule_runs(schedule_id), {job_id: slot})
        pipe.zremrangebyrank(keys.schedule_runs(schedule_id), 0, -(RUNS_KEPT + 1))

    def runs(
        self, schedule_id: str, *, before: float | None = None, limit: int = 50
    ) -> list[tuple[str, float]]:
        """Job ids the schedule created, newest slot first, strictly before ``before``."""
        top = f"({before}" if before is not None else "+inf"
        rows = self.r.zrevrangebyscore(
            keys.schedule_runs(schedule_id), top, "-inf", start=0, num=limit, withscores=True
        )
        return [(k.decode(), float(s)) for k, s in rows]
