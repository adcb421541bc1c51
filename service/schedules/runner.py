"""The slot runner: every few seconds (beat's ``schedules.tick``) it makes the jobs that are due.

:func:`tick` scans the enabled schedules whose next run is due (a sorted set by next run time)
and handles each one's slot:

* on time (at most ``IMAGEBATCH_SCHEDULE_LATE_SECONDS`` late): the slot's job is made;
* later than that (nothing ran across the slot: the stack was down): ``catch_up: one`` makes
  one job, for the latest missed slot; ``catch_up: none`` skips them. Either way the schedule
  then waits for its next slot after now.

Exactly one job per slot, however many beat or worker processes run and whatever restarts: the
slot's job id is derived from the schedule and the slot (:func:`slot_job_id`), a lease per
(schedule, slot) keeps two processes from making it at once, and a slot whose job already
exists is only moved past. A process that dies while making a job leaves the slot due: its
lease lapses and the next tick makes the job (intake's steps are safe to repeat with the same
id until the job is recorded). The schedule then moves to its next slot by compare-and-set.

Every run goes through :func:`service.jobs.intake.submit`, the one way in: the catalog is read
at that moment, budgets (the run's ``max_cost_usd``, the tenant's caps) apply, and reuse
means only the rows that changed cost anything. A run intake refuses (a bad catalog, a tenant
over budget) is recorded as the schedule's last error and the schedule moves on; a catalog that
cannot be read for a transient reason is tried again at the next ticks, for up to
:data:`RETRY_WINDOW_SECONDS` after its slot.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from service import metrics
from service.context import Context
from service.errors import Problem
from service.jobs import intake
from service.redis import keys
from service.redis.leases import Lease
from service.schedules import define, slots
from service.schedules.model import Schedule
from service.schedules.store import ScheduleStore
from service.storage import StorageError

log = logging.getLogger("imagebatch.schedules")

SLOT_LEASE_SECONDS = 60.0
RETRY_WINDOW_SECONDS = 600.0


def slot_job_id(schedule_id: str, slot: float) -> str:
    """The job id of a schedule's slot: the same in every process, sortable like intake's."""
    digest = hashlib.sha256(f"{schedule_id}|{int(slot)}".encode()).hexdigest()[:12]
    return f"job_{int(slot * 1000):011x}{digest}"


def tick(ctx: Context, now: float | None = None) -> dict[str, int]:
    """Handle every due schedule once; returns counts of what happened (for logs and tests)."""
    now = time.time() if now is None else now
    store = ScheduleStore(ctx.redis)
    seen = {"created": 0, "skipped": 0, "failed": 0, "waiting": 0}
    ctx.redis.incr(keys.SCHEDULE_TICKS)
    for schedule_id in store.due(now):
        outcome = handle(ctx, store, schedule_id, now)
        seen[outcome] = seen.get(outcome, 0) + 1
        if outcome in ("created", "skipped", "failed"):
            metrics.count(ctx.redis, metrics.SCHEDULE_RUNS, {"outcome": outcome})
    return seen


def handle(ctx: Context, store: ScheduleStore, schedule_id: str, now: float) -> str:
    """One due schedule's slot: ``created``, ``skipped``, ``failed``, ``waiting`` (retry later)
    or ``none`` (nothing to do: not due after all, or another process has it)."""
    schedule = store.get(schedule_id)
    if schedule is None or not schedule.enabled or schedule.next_run_at is None:
        store.undue(schedule_id)
        return "none"
    slot = schedule.next_run_at
    if slot > now:
        return "none"
    if now - slot <= ctx.settings.schedule_late_seconds:
        return _run_slot(ctx, store, schedule, slot, slot, now)
    # Nothing ran across the slot (the stack was down): catch_up decides.
    latest = slots.latest_at_or_before(schedule.cron, schedule.timezone, now) or slot
    if schedule.catch_up == "one":
        return _run_slot(ctx, store, schedule, slot, latest, now, moved_to=now)
    nxt = slots.next_after(schedule.cron, schedule.timezone, now)
    store.advance(
        schedule_id, slot, nxt, last_error=f"missed slots up to {_iso(latest)} (catch_up: none)"
    )
    log.info("schedule %s: missed slot %s skipped (catch_up none)", schedule_id, _iso(latest))
    return "skipped"


def _run_slot(
    ctx: Context,
    store: ScheduleStore,
    schedule: Schedule,
    expected: float,
    slot: float,
    now: float,
    moved_to: float | None = None,
) -> str:
    """Make the job of ``slot`` unless it exists, then move the schedule past ``expected``."""
    job_id = slot_job_id(schedule.id, slot)
    lease = Lease(ctx.redis, keys.schedule_slot_lock(schedule.id, int(slot)), SLOT_LEASE_SECONDS)
    with lease.held() as got:
        if not got:
            return "none"  # another process is making this slot's job
        error = None
        outcome = "created"
        if ctx.store.job(job_id) is None:
            try:
                make_job(ctx, schedule, job_id)
            except _Later as exc:
                if now - slot < RETRY_WINDOW_SECONDS:
                    log.warning(
                        "schedule %s slot %s: %s; trying again", schedule.id, _iso(slot), exc
                    )
                    return "waiting"
                error, outcome = str(exc), "failed"
            except Problem as exc:
                error, outcome = exc.detail, "failed"
        # else: made before, by a process that died before it moved the schedule on.
        nxt = slots.next_after(schedule.cron, schedule.timezone, moved_to or slot)
        created = outcome != "failed"
        fields: dict[str, Any] = {
            "last_slot": repr(slot),
            "last_run_at": repr(time.time()),
            "last_job_id": job_id if created else None,
            "last_error": error,
        }
        if created:
            store.add_run(schedule.id, job_id, slot)
        store.advance(schedule.id, expected, nxt, **fields)
    if error:
        log.warning("schedule %s slot %s: no job: %s", schedule.id, _iso(slot), error)
    else:
        log.info("schedule %s slot %s: job %s", schedule.id, _iso(slot), job_id)
    return outcome


class _Later(Exception):
    """The run could not be made now for a reason that may pass (the catalog is unreachable)."""


def make_job(
    ctx: Context, schedule: Schedule, job_id: str | None = None, idempotency_key: str | None = None
) -> intake.Submission:
    """Read the catalog (if any), build the job and submit it through intake."""
    catalog = None
    if schedule.catalog_url is not None:
        try:
            catalog = define.read_catalog(ctx, schedule.catalog_url)
        except define.CatalogUnavailable as exc:
            if exc.transient:
                raise _Later(str(exc)) from None
            raise Problem(422, "Catalog unavailable", str(exc)) from None
    spec = define.job_spec(ctx, schedule, catalog)
    try:
        return intake.submit(ctx, spec, schedule.tenant, idempotency_key, job_id=job_id)
    except StorageError as exc:
        if exc.transient:
            raise _Later(str(exc)) from None
        raise


def run_now(
    ctx: Context, schedule: Schedule, idempotency_key: str | None = None
) -> intake.Submission:
    """``POST /v1/schedules/{id}/run``: a job now, outside the slot sequence (which is kept)."""
    store = ScheduleStore(ctx.redis)
    now = time.time()
    try:
        done = make_job(ctx, schedule, idempotency_key=idempotency_key)
    except _Later as exc:
        store.note_run(schedule.id, None, now, str(exc))
        raise Problem(503, "Catalog unavailable", str(exc)) from None
    except Problem as exc:
        store.note_run(schedule.id, None, now, exc.detail)
        raise
    store.note_run(schedule.id, done.job.id, now, None)
    return done


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
