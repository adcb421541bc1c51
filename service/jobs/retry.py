"""Retry in place: a finished job runs some of its items again and ends with one manifest.

``POST /v1/jobs/{id}/retry`` (and the console, and ``imagebatch retry``) call :func:`retry_job`
with a :class:`RetryRequest`: the job's failed items by default, also its cancelled or
budget-exhausted ones when ``statuses`` says so, or exactly the ``items`` listed, each with
optional overrides validated as intake validates an item (``{"id": "sku-7", "prompt": "…"}``).

Where the state comes from: when a job finishes, Redis drops its per-item state and the manifest
in storage becomes the record. A retry therefore rebuilds the job's item states, usage, errors
and fingerprints from the manifest (succeeded items keep their images, usage and cost; the chosen
items go back to pending with fresh attempts), sets the counts from what it read, and puts the job
back to ``queued``; planning, collecting and finalizing then run as for a new job, and finalize
writes the one manifest of every item. Spend is never rebuilt: the job's spend hash was kept and
only grows by what the retried items cost, each counted once as always.

Overridden items need their new request lines stored: ``request.jsonl`` is always the request
as it stands now (every step reads it), and before a retry changes it the current one is copied
to ``request.v{n}.jsonl`` (n = the retry's number) and never written again, so what a caller
submitted, and every later version, stays readable.

At least once and concurrency: the whole set-up runs under a lease (one retry of a job at a
time); the job's status moves from a final one to ``queued`` by compare-and-set at the end, so a
crash before that leaves a finished job that can simply be retried again. An Idempotency-Key
makes a repeated call return the first call's outcome; a job that is not finished is a 409.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from service import pricing
from service.context import Context
from service.errors import FieldErrors, conflict, invalid, malformed
from service.jobs.deadline import DEADLINE
from service.jobs.model import (
    CANCELLED,
    FAILED,
    JOB_FINAL,
    JOB_QUEUED,
    NO_CHUNK,
    PENDING,
    SUCCEEDED,
    Job,
    pack_item,
)
from service.jobs.request import RequestLine, request_pages, request_record
from service.jobs.reuse import ReuseIndex
from service.jobs.schema import MAX_COST_USD, ItemSpec
from service.jobs.spec import parse_job_json
from service.queues import PLAN, SYNC_ITEMS
from service.redis import keys
from service.redis.leases import Lease
from service.storage import manifest_key, request_key, request_version_key

# What a retry may select by status. "budget_exhausted" items are the cancelled ones a money cap
# stopped; "cancelled" the ones a cancel stopped.
STATUSES = ("failed", "cancelled", "budget_exhausted")
RETRY_FIELDS = ("statuses", "items", "max_cost_usd")
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
LOCK_SECONDS = 60.0
_PAGE = 1000
_LETTER = {"succeeded": SUCCEEDED, "failed": FAILED, "cancelled": CANCELLED}


@dataclass(frozen=True)
class RetryRequest:
    """What to retry: items in ``statuses``, or exactly ``items`` (id -> overrides)."""

    statuses: tuple[str, ...] = ("failed",)
    items: dict[str, dict[str, Any]] | None = None
    max_cost_usd: float | None = None


@dataclass(frozen=True)
class RetryOutcome:
    job: Job
    retried: int  # items sent back to run
    created: bool  # False when an Idempotency-Key replayed an earlier call


def parse_retry_body(body: bytes) -> RetryRequest:
    """The retry body: ``{}``, ``{"statuses": [...]}`` or ``{"items": [{"id": …, …}]}``, with an
    optional ``max_cost_usd`` (a new cap for the job). Raises :class:`Problem` naming the field."""
    if not body.strip():
        return RetryRequest()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise malformed(f"The body is not valid JSON: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise invalid("", "the body must be a JSON object")
    errs = FieldErrors()
    for key in doc:
        if key not in RETRY_FIELDS:
            errs.add(str(key)[:64], f"unknown field; a retry takes {', '.join(RETRY_FIELDS)}")
    statuses = _statuses(doc.get("statuses"), errs)
    items = _items(doc.get("items"), errs)
    if items is not None and doc.get("statuses") is not None:
        errs.add("statuses", "give either statuses or items, not both")
    cap = doc.get("max_cost_usd")
    if cap is not None and (
        isinstance(cap, bool)
        or not isinstance(cap, (int, float))
        or not math.isfinite(cap)
        or not 0 < cap <= MAX_COST_USD
    ):
        errs.add(
            "max_cost_usd", f"max_cost_usd must be a number above 0 and at most {MAX_COST_USD:,.0f}"
        )
        cap = None
    errs.raise_if_any()
    return RetryRequest(statuses, items, float(cap) if cap is not None else None)


def _statuses(raw: Any, errs: FieldErrors) -> tuple[str, ...]:
    if raw is None:
        return ("failed",)
    if not isinstance(raw, list) or not raw:
        errs.add("statuses", f"statuses must be a non-empty array of {', '.join(STATUSES)}")
        return ()
    for k, value in enumerate(raw):
        if value not in STATUSES:
            errs.add(f"statuses[{k}]", f"must be one of {', '.join(STATUSES)}, not {value!r:.64}")
    return tuple(dict.fromkeys(v for v in raw if v in STATUSES))


def _items(raw: Any, errs: FieldErrors) -> dict[str, dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        errs.add("items", "items must be a non-empty array of {id, ...overrides}")
        return None
    out: dict[str, dict[str, Any]] = {}
    for k, item in enumerate(raw):
        path = f"items[{k}]"
        if not isinstance(item, dict):
            errs.add(path, "an item must be an object with the id of an item of this job", k)
            continue
        item_id = item.get("id")
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or not item_id:
            errs.add(f"{path}.id", "id is required: the id of an item of this job", k)
            continue
        if item_id in out:
            errs.add(f"{path}.id", f"item '{item_id:.128}' is listed twice", k, item_id)
            continue
        # Override fields are checked with the item, as intake checks one (_overridden).
        out[item_id] = {key: v for key, v in item.items() if key != "id"}
    return out


# --- the retry ---------------------------------------------------------------------------------


def retry_job(
    ctx: Context,
    job: Job,
    request: RetryRequest,
    idempotency_key: str | None = None,
) -> RetryOutcome:
    """Retry ``job`` (the caller's own, already looked up) in place. See the module docstring."""
    idem = keys.retry_idempotency(job.tenant, job.id, idempotency_key) if idempotency_key else None
    if idem is not None:
        done = ctx.redis.get(idem)
        if done is not None:
            return RetryOutcome(ctx.store.job(job.id) or job, int(done), created=False)
    if not job.is_final:
        raise conflict(
            f"job '{job.id}' is {job.status}; retry it once it has finished",
            extra={"status": job.status},
        )
    with Lease(ctx.redis, keys.retry_lock(job.id), LOCK_SECONDS).held() as got:
        current = ctx.store.job(job.id)
        if not got or current is None or not current.is_final:
            raise conflict(f"job '{job.id}' is being retried already")
        retried = _retry(ctx, current, request)
    if idem is not None:
        ctx.redis.set(idem, retried, nx=True, ex=IDEMPOTENCY_TTL_SECONDS)
    return RetryOutcome(ctx.store.job(job.id) or job, retried, created=True)


def _retry(ctx: Context, job: Job, request: RetryRequest) -> int:
    chosen = _choose(ctx, job, request)
    if not chosen:
        what = "listed" if request.items is not None else "/".join(request.statuses)
        raise conflict(f"job '{job.id}' has no {what} items to retry", extra={"status": job.status})
    overrides = _overridden(ctx, job, request, chosen) if request.items else {}
    _check_budget(ctx, job, chosen, overrides)
    version = int(ctx.redis.incr(keys.job_retry_seq(job.id)))
    if overrides:
        _new_request_version(ctx, job, version, overrides)
    counts = _rebuild_state(ctx, job, set(chosen))
    fields: dict[str, Any] = {
        "finished_at": None,
        "budget_exhausted": None,
        "reason": None,
        "retries": version,
        # A deadline was the first run's: a retry runs without one, on the lane it started on.
        "deadline": None,
        "on_deadline": None,
    }
    if job.lane_reason == DEADLINE:
        fields |= {"mode": "batch", "lane_reason": None, "switched_at": None}
        job = replace(job, mode="batch")
    if request.max_cost_usd is not None:
        fields["max_cost_usd"] = request.max_cost_usd
    if not ctx.store.set_job_status_if(job.id, JOB_FINAL, JOB_QUEUED, **fields):
        raise conflict(f"job '{job.id}' changed while the retry was set up; try again")
    ctx.store.reopen(job.id)
    ctx.enqueue(SYNC_ITEMS if job.mode == "sync" else PLAN, job.id)
    return counts["pending"]


def _manifest_pages(ctx: Context, job_id: str) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for raw in ctx.storage.iter_lines(manifest_key(job_id)):
        if raw.strip():
            page.append(orjson.loads(raw))
            if len(page) >= _PAGE:
                yield page
                page = []
    if page:
        yield page


def _selected_status(line: Mapping[str, Any]) -> str:
    status = str(line.get("status"))
    if status == "cancelled" and (line.get("error") or {}).get("code") == "budget_exhausted":
        return "budget_exhausted"
    return status


def _choose(ctx: Context, job: Job, request: RetryRequest) -> dict[int, str]:
    """Index -> id of the items to run again (listed ids must be the job's)."""
    chosen: dict[int, str] = {}
    wanted = request.items
    for page in _manifest_pages(ctx, job.id):
        for line in page:
            if wanted is not None:
                if line["id"] in wanted:
                    chosen[int(line["index"])] = line["id"]
            elif _selected_status(line) in request.statuses:
                chosen[int(line["index"])] = line["id"]
    if wanted is not None and len(chosen) < len(wanted):
        found = set(chosen.values())
        errs = FieldErrors()
        for k, item_id in enumerate(wanted):
            if item_id not in found:
                errs.add(
                    f"items[{k}].id", f"job '{job.id}' has no item '{item_id:.128}'", k, item_id
                )
        errs.raise_if_any()
    return chosen


def _overridden(
    ctx: Context, job: Job, request: RetryRequest, chosen: dict[int, str]
) -> dict[int, ItemSpec]:
    """The listed items with overrides, validated as intake validates items; index -> spec."""
    assert request.items is not None
    by_id = {item_id: index for index, item_id in chosen.items()}
    originals: dict[str, RequestLine] = {}
    for page in request_pages(ctx.storage, job.id):
        for line in page:
            if line.id in request.items:
                originals[line.id] = line
    if not any(request.items.values()):
        return {}
    # Every listed item is validated (error paths then name its place in the retry body), the
    # unchanged ones too: a model shut down since cannot be retried either.
    merged = [_merge(originals[i], request.items[i]) for i in request.items]
    spec = parse_job_json(
        orjson.dumps({"model": job.model, "items": merged}),
        ctx.catalog,
        max_items=len(merged),
        models=ctx.models(),  # a model upstream has shut down since cannot be retried
    )
    return {
        by_id[item.id]: ItemSpec(by_id[item.id], item.id, item.endpoint, item.body)
        for item in spec.items
        if request.items[item.id]
    }


def _merge(line: RequestLine, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The item as a job body would give it, with the overrides applied (null drops a field)."""
    item: dict[str, Any] = {"id": line.id}
    item.update({k: v for k, v in line.body.items() if k != "model"})
    for key, value in overrides.items():
        if value is None:
            item.pop(key, None)
        else:
            item[key] = value
    return item


def _check_budget(
    ctx: Context, job: Job, chosen: dict[int, str], overrides: dict[int, ItemSpec]
) -> None:
    """The tenant's caps still hold with what the retried items are expected to cost."""

    def items() -> Iterator[ItemSpec]:
        for page in request_pages(ctx.storage, job.id):
            for line in page:
                if line.index in chosen:
                    yield overrides.get(line.index) or line.item()

    cost = pricing.estimate_job(items(), ctx.catalog)
    ctx.budgets.check_tenant(ctx.budgets.tenant(job.tenant), cost.nanousd(job.mode), job.mode)


def _new_request_version(
    ctx: Context, job: Job, version: int, overrides: dict[int, ItemSpec]
) -> None:
    """Keep the current request as ``request.v{version}.jsonl``, then write the new one."""
    ctx.storage.copy(request_key(job.id), request_version_key(job.id, version))
    with ctx.storage.writer(
        request_key(job.id),
        content_type="application/jsonl",
        metadata={"job": job.id, "tenant": job.tenant, "version": str(version + 1)},
    ) as out:
        for page in request_pages(ctx.storage, job.id, key=request_version_key(job.id, version)):
            for line in page:
                new = overrides.get(line.index)
                out.write(request_record(new) if new else request_record(line.item()))


def _rebuild_state(ctx: Context, job: Job, chosen: set[int]) -> dict[str, int]:
    """Item states, usage, errors and fingerprints from the manifest; returns the new counts."""
    counts = {"pending": 0, "queued": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    ctx.store.drop_items(job.id)
    reuse_index = ReuseIndex.of(ctx, job.tenant)
    for page in _manifest_pages(ctx, job.id):
        states: dict[str, str] = {}
        usage: dict[str, bytes] = {}
        errors: dict[str, bytes] = {}
        prints: dict[str, str] = {}
        for line in page:
            index, item_id = str(line["index"]), str(line["id"])
            if int(index) in chosen:
                states[index] = pack_item(PENDING, 0, NO_CHUNK, item_id)
                counts["pending"] += 1
                _forget_own_image(reuse_index, job.id, line)
                continue
            status = str(line["status"])
            letter = _LETTER.get(status, FAILED)
            counts[status if status in _LETTER else "failed"] += 1
            states[index] = pack_item(letter, int(line.get("attempts") or 0), NO_CHUNK, item_id)
            if letter == SUCCEEDED:
                usage[index] = orjson.dumps(_usage_record(line))
                if line.get("fingerprint"):
                    prints[index] = line["fingerprint"]
            elif line.get("error"):
                errors[index] = orjson.dumps(line["error"])
        ctx.store.restore_items(job.id, states, usage, errors, prints)
    ctx.store.set_counts(job.id, counts)
    return counts


def _forget_own_image(index: ReuseIndex, job_id: str, line: Mapping[str, Any]) -> None:
    """A succeeded item listed to be made again must not be "reused" from its own image."""
    print_ = line.get("fingerprint")
    if line.get("status") != "succeeded" or not print_:
        return
    (entry,) = index.lookup([print_])
    if entry is not None and (entry.job_id, entry.item_id) == (job_id, line["id"]):
        index.forget(print_)


def _usage_record(line: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest line's usage as collect records it (what the next manifest is built from)."""
    record: dict[str, Any] = {
        "tokens": line.get("usage") or {},
        "cost_nanousd": round(float(line.get("cost_usd") or 0) * 1e9),
        "tier": line.get("tier"),
        "keys": list(line.get("keys") or []),
        "chunk": NO_CHUNK,
    }
    if line.get("reused_from"):
        record["reused_from"] = line["reused_from"]
        record["saved_nanousd"] = round(float(line.get("saved_usd") or 0) * 1e9)
    return record
