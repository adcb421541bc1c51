"""A schedule as callers write it: validating a create or PATCH body, and the job of a run.

Validation is intake's: the job template is parsed exactly as ``POST /v1/jobs`` would parse it
(a catalog is read and parsed as CSV intake would), with the schedule's labels, its
``schedule`` label and its ``max_cost_usd`` merged in, so a schedule that is accepted makes jobs
that are accepted. Errors are 422 problems naming the field (``cron``, ``timezone``,
``job.items[3].size``, ``catalog.rows[7].id``, …).

Catalogs: ``catalog_url`` is read at every run (and once at creation, to check it) with a size
cap of ``IMAGEBATCH_SCHEDULE_CATALOG_MAX_BYTES``: ``s3://bucket/key`` and ``file:///path``
through storage, as reference images are read (``file://`` only under
``IMAGEBATCH_LOCAL_REF_ROOTS``), or ``https://`` (no redirects, 30 s).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx2
import orjson

from service.context import Context
from service.errors import FieldError, FieldErrors, Problem, validation_problem
from service.jobs.schema import CSV_PARAMS, MAX_COST_USD, MAX_LABELS, JobSpec
from service.jobs.spec import parse_job_csv, parse_job_json
from service.schedules import slots
from service.schedules.model import CATCH_UP, SCHEDULE_LABEL, Schedule, new_schedule_id
from service.storage import ObjectNotFound, ObjectTooLarge, StorageError

FIELDS = (
    "name",
    "cron",
    "timezone",
    "job",
    "catalog_url",
    "template",
    "params",
    "labels",
    "max_cost_usd",
    "enabled",
    "catch_up",
)
MAX_NAME_CHARS = 200
# An inline job is kept in Redis with the schedule: bigger catalogs belong at a catalog_url.
MAX_JOB_BYTES = 8 * 1024 * 1024
CATALOG_SCHEMES = ("s3://", "file://", "https://")


class CatalogUnavailable(Exception):
    """The catalog could not be read now; ``transient`` says whether later may work."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "The request body could not be read", f"not JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise validation_problem([FieldError("", "the body must be a JSON object")])
    return doc


def create(ctx: Context, tenant: str, doc: Mapping[str, Any], now: float | None = None) -> Schedule:
    """A new schedule from a create body (validated; not yet saved)."""
    now = time.time() if now is None else now
    base = Schedule(id=new_schedule_id(), tenant=tenant, name="", cron="", created_at=now)
    return _build(ctx, base, doc, now, creating=True)


def patch(
    ctx: Context, current: Schedule, doc: Mapping[str, Any], now: float | None = None
) -> Schedule:
    """The schedule with a PATCH body applied (validated; not yet saved). Giving ``job`` drops
    the catalog fields and giving ``catalog_url`` drops ``job``; ``null`` clears a field."""
    now = time.time() if now is None else now
    return _build(ctx, current, doc, now, creating=False)


def _build(
    ctx: Context, base: Schedule, doc: Mapping[str, Any], now: float, *, creating: bool
) -> Schedule:
    errs = FieldErrors()
    for key in doc:
        if key not in FIELDS:
            errs.add(str(key)[:64], f"unknown field; a schedule has {', '.join(FIELDS)}")
    values = dataclasses.asdict(base)
    for key in FIELDS:
        if key in doc:
            values[key] = doc[key]
    if "job" in doc and doc["job"] is not None:
        values.update(catalog_url=None, template=None, params={})
    elif "catalog_url" in doc and doc["catalog_url"] is not None:
        values["job"] = None
    _check_simple(values, errs, creating)
    errs.raise_if_any()
    schedule = Schedule(**{**values, "updated_at": now})
    check_template(ctx, schedule)
    moved = creating or any(k in doc for k in ("cron", "timezone", "enabled"))
    if moved:
        schedule = dataclasses.replace(schedule, next_run_at=schedule.first_slot(now))
    return schedule


def _check_simple(values: dict[str, Any], errs: FieldErrors, creating: bool) -> None:
    name = values.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        errs.add("name", f"name is required: 1 to {MAX_NAME_CHARS} characters")
    problem = slots.cron_problem(values.get("cron"))
    if problem:
        errs.add("cron", problem)
    if values.get("timezone") is None:
        values["timezone"] = "UTC"
    problem = slots.timezone_problem(values["timezone"])
    if problem:
        errs.add("timezone", problem)
    job, url = values.get("job"), values.get("catalog_url")
    if (job is None) == (url is None):
        errs.add("job", "give either job (a job body) or catalog_url (a CSV), not both or neither")
    if job is not None and not isinstance(job, dict):
        errs.add("job", "job must be a job body (an object, as POST /v1/jobs takes)")
    elif job is not None and len(orjson.dumps(job)) > MAX_JOB_BYTES:
        errs.add("job", f"job is over {MAX_JOB_BYTES // 2**20} MB; put the rows in a catalog_url")
    if url is not None and (not isinstance(url, str) or not url.startswith(CATALOG_SCHEMES)):
        errs.add("catalog_url", f"catalog_url must start with {', '.join(CATALOG_SCHEMES)}")
    if values.get("template") is not None and not isinstance(values["template"], str):
        errs.add("template", "template must be a string with {column} placeholders")
    params = values.get("params")
    if params is None:
        values["params"] = params = {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        errs.add("params", "params must be an object of strings (CSV intake's query parameters)")
    elif unknown := [k for k in params if k not in CSV_PARAMS and not k.startswith("label.")]:
        errs.add(
            f"params.{unknown[0][:64]}", f"not a job field of CSV intake ({', '.join(CSV_PARAMS)})"
        )
    labels = values.get("labels")
    if labels is None:
        values["labels"] = labels = {}
    if not isinstance(labels, dict) or len(labels) >= MAX_LABELS:
        errs.add("labels", f"labels must be an object of at most {MAX_LABELS - 1} strings")
    cap = values.get("max_cost_usd")
    if cap is not None and (
        isinstance(cap, bool)
        or not isinstance(cap, (int, float))
        or not (math.isfinite(cap) and 0 < cap <= MAX_COST_USD)
    ):
        errs.add(
            "max_cost_usd", f"max_cost_usd must be a number above 0 and at most {MAX_COST_USD:,.0f}"
        )
    if not isinstance(values.get("enabled"), bool):
        errs.add("enabled", "enabled must be true or false")
    if values.get("catch_up") not in CATCH_UP:
        errs.add("catch_up", f"catch_up must be one of {', '.join(CATCH_UP)}")


def check_template(ctx: Context, schedule: Schedule) -> None:
    """Parse the job a run would make now; a 422 naming the field if intake would refuse it."""
    catalog = None
    if schedule.catalog_url is not None:
        try:
            catalog = read_catalog(ctx, schedule.catalog_url)
        except CatalogUnavailable as exc:
            raise validation_problem([FieldError("catalog_url", str(exc))]) from None
    try:
        job_spec(ctx, schedule, catalog)
    except Problem as exc:
        prefix = "job" if schedule.job is not None else "catalog"
        errors = [
            dataclasses.replace(e, field=f"{prefix}.{e.field}" if e.field else prefix)
            for e in exc.errors
        ] or [FieldError(prefix, exc.detail)]
        raise validation_problem(errors, status=422) from None


def job_spec(ctx: Context, schedule: Schedule, catalog: bytes | None) -> JobSpec:
    """The job a run makes: the template with the schedule's labels and budget merged in."""
    limit = ctx.settings.max_items_per_job
    # Checked against upstream's model lifecycle, as intake checks a submitted job.
    models = ctx.models()
    extra = {**schedule.labels, SCHEDULE_LABEL: schedule.id}
    if schedule.job is not None:
        doc = dict(schedule.job)
        labels = doc.get("labels")
        doc["labels"] = {**labels, **extra} if isinstance(labels, dict) else labels or extra
        if schedule.max_cost_usd is not None:
            doc["max_cost_usd"] = schedule.max_cost_usd
        return parse_job_json(orjson.dumps(doc), ctx.catalog, max_items=limit, models=models)
    params = dict(schedule.params)
    if schedule.template is not None:
        params["template"] = schedule.template
    for key, value in extra.items():
        params[f"label.{key}"] = value
    if schedule.max_cost_usd is not None:
        params["max_cost_usd"] = repr(schedule.max_cost_usd)
    return parse_job_csv(catalog or b"", params, ctx.catalog, max_items=limit, models=models)


def read_catalog(ctx: Context, url: str) -> bytes:
    """The catalog's bytes now. Raises :class:`CatalogUnavailable`."""
    cap = ctx.settings.schedule_catalog_max_bytes
    if url.startswith("https://"):
        return _read_https(url, cap)
    try:
        data = ctx.storage.read_ref(url)
    except (ObjectNotFound, ObjectTooLarge, ValueError) as exc:
        raise CatalogUnavailable(
            f"catalog {url!r} cannot be read: {exc}", transient=False
        ) from None
    except StorageError as exc:
        raise CatalogUnavailable(
            f"catalog {url!r} cannot be read now: {exc}", transient=True
        ) from None
    if len(data) > cap:
        raise CatalogUnavailable(f"catalog {url!r} is over {cap:,} bytes", transient=False)
    return data


def _read_https(url: str, cap: int) -> bytes:
    try:
        with (
            httpx2.Client(timeout=30, follow_redirects=False) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code != 200:
                raise CatalogUnavailable(
                    f"catalog {url!r}: the server answered {resp.status_code}",
                    transient=resp.status_code >= 500 or resp.status_code == 429,
                )
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > cap:
                    raise CatalogUnavailable(
                        f"catalog {url!r} is over {cap:,} bytes", transient=False
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx2.HTTPError as exc:
        raise CatalogUnavailable(
            f"catalog {url!r} cannot be fetched: {exc}", transient=True
        ) from None
