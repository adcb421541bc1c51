"""A schedule: a cron slot sequence in a time zone, and the job each slot makes.

The job is described either by ``job`` (a JSON job body, exactly as ``POST /v1/jobs`` takes it)
or by ``catalog_url`` (a CSV read afresh at every run) with ``template`` and ``params`` (the job
fields of CSV intake: ``model``, ``size``, ``quality``, ``id_column``, …). ``labels`` and
``max_cost_usd`` apply to every run on top of the template's; every run's job also carries the
label ``schedule`` with the schedule's id.

Redis keeps a schedule as a hash of strings (:data:`service.redis.keys.schedule`); the
conversion lives here and nowhere else.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.schedules import slots

CATCH_UP = ("none", "one")
# The label every run's job carries; GET /v1/jobs?schedule={id} finds runs by it.
SCHEDULE_LABEL = "schedule"


def new_schedule_id() -> str:
    return f"sch_{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Schedule:
    id: str
    tenant: str
    name: str
    cron: str
    timezone: str = "UTC"
    job: dict[str, Any] | None = None
    catalog_url: str | None = None
    template: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    max_cost_usd: float | None = None
    enabled: bool = True
    catch_up: str = "none"
    created_at: float = 0.0
    updated_at: float = 0.0
    next_run_at: float | None = None
    last_slot: float | None = None
    last_run_at: float | None = None
    last_job_id: str | None = None
    last_error: str | None = None

    def first_slot(self, now: float) -> float | None:
        """The slot the schedule waits for from ``now`` (None when paused)."""
        return slots.next_after(self.cron, self.timezone, now) if self.enabled else None

    def to_hash(self) -> dict[str, str]:
        fields: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "job": orjson.dumps(self.job).decode() if self.job is not None else "",
            "catalog_url": self.catalog_url or "",
            "template": self.template or "",
            "params": orjson.dumps(self.params).decode(),
            "labels": orjson.dumps(self.labels).decode(),
            "max_cost_usd": "" if self.max_cost_usd is None else repr(self.max_cost_usd),
            "enabled": "1" if self.enabled else "0",
            "catch_up": self.catch_up,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "next_run_at": "" if self.next_run_at is None else repr(self.next_run_at),
            "last_slot": "" if self.last_slot is None else repr(self.last_slot),
            "last_run_at": "" if self.last_run_at is None else repr(self.last_run_at),
            "last_job_id": self.last_job_id or "",
            "last_error": self.last_error or "",
        }
        return {k: str(v) for k, v in fields.items()}

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> Schedule:
        def num(name: str) -> float | None:
            value = raw.get(name)
            return float(value) if value else None

        return cls(
            id=raw["id"],
            tenant=raw["tenant"],
            name=raw.get("name", ""),
            cron=raw["cron"],
            timezone=raw.get("timezone") or "UTC",
            job=orjson.loads(raw["job"]) if raw.get("job") else None,
            catalog_url=raw.get("catalog_url") or None,
            template=raw.get("template") or None,
            params=orjson.loads(raw.get("params") or "{}"),
            labels=orjson.loads(raw.get("labels") or "{}"),
            max_cost_usd=num("max_cost_usd"),
            enabled=raw.get("enabled", "1") == "1",
            catch_up=raw.get("catch_up") or "none",
            created_at=num("created_at") or 0.0,
            updated_at=num("updated_at") or 0.0,
            next_run_at=num("next_run_at"),
            last_slot=num("last_slot"),
            last_run_at=num("last_run_at"),
            last_job_id=raw.get("last_job_id") or None,
            last_error=raw.get("last_error") or None,
        )


def schedule_view(schedule: Schedule, last_status: str | None) -> dict[str, Any]:
    """How a schedule looks to callers (the API, the CLI, the console)."""
    template: dict[str, Any]
    if schedule.job is not None:
        template = {"job": schedule.job}
    else:
        template = {
            "catalog_url": schedule.catalog_url,
            "template": schedule.template,
            "params": schedule.params,
        }
    return {
        "id": schedule.id,
        "object": "schedule",
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "description": slots.describe(schedule.cron),
        "enabled": schedule.enabled,
        "catch_up": schedule.catch_up,
        **template,
        "labels": schedule.labels,
        "max_cost_usd": schedule.max_cost_usd,
        "next_run_at": iso(schedule.next_run_at),
        "last_run": {
            "slot": iso(schedule.last_slot),
            "at": iso(schedule.last_run_at),
            "job_id": schedule.last_job_id,
            "status": last_status,
            "error": schedule.last_error,
        },
        "created_at": iso(schedule.created_at),
        "updated_at": iso(schedule.updated_at),
        "links": {
            "self": f"/v1/schedules/{schedule.id}",
            "runs": f"/v1/jobs?schedule={schedule.id}",
        },
    }
