"""Redo: make some of a job's images again, each with an edited prompt.

The console's gallery calls :func:`redo` for the items a reviewer rejected (or that failed), and
a job's page :func:`retry_failed` for all its failed items, prompts unchanged. A finished job
redoes them in place (:mod:`service.jobs.retry`: the same job runs those items again with the
edited prompts and ends with one manifest); their review decisions are cleared, as their images
are new. A job still running cannot be retried in place, so its items are submitted again
through intake as a new job of those items alone (same model, parameters and labels, the edited
prompts, the label ``redo_of``), and each redone item's review decision records that job
(``redo`` in its review record).

Failure semantics: an item that is not in the job, or an edited prompt intake refuses, is a 422
:class:`~service.errors.Problem` naming it, and nothing is submitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from service.context import Context
from service.errors import FieldErrors
from service.jobs import intake, retry, review
from service.jobs.model import Job
from service.jobs.pages import item_lines
from service.jobs.spec import parse_job_json

MAX_ITEMS = 1000


@dataclass(frozen=True)
class Redone:
    job_id: str  # the job that makes the images again
    items: int
    in_place: bool  # True: the same job runs them again; False: a new job of those items


def _lines(
    ctx: Context, job: Job, wanted: Mapping[int, str]
) -> dict[int, tuple[dict[str, Any], Any]]:
    found = {}
    for index in sorted(wanted):
        if 0 <= index < job.items:
            item, line = next(item_lines(ctx, job, index), (None, None))
            if item is not None and item["id"] == wanted[index]:
                found[index] = (item, line)
    return found


def redo(ctx: Context, job: Job, edits: Mapping[int, tuple[str, str]], tenant: str) -> Redone:
    """Make the items ``edits`` names (index -> (id, new prompt)) again: in place when the job
    has finished (a retry with the edited prompts), else as a new job of those items."""
    errs = FieldErrors()
    if not edits or len(edits) > MAX_ITEMS:
        errs.add("items", f"choose 1 to {MAX_ITEMS:,} items to redo")
        errs.raise_if_any()
    if job.is_final:
        return _in_place(ctx, job, edits)
    found = _lines(ctx, job, {i: item_id for i, (item_id, _) in edits.items()})
    items = []
    for k, (index, (item_id, prompt)) in enumerate(sorted(edits.items())):
        if index not in found:
            errs.add(f"items[{k}].id", f"job {job.id} has no item '{item_id}'", k, item_id)
            continue
        _, line = found[index]
        body = {key: value for key, value in line.body.items() if key != "model"}
        items.append({"id": item_id, **body, "prompt": prompt.strip() or body.get("prompt")})
    errs.raise_if_any()
    document = {
        "model": job.model,
        "mode": job.requested_mode,
        "items": items,
        "labels": {**job.labels, "redo_of": job.id},
    }
    spec = parse_job_json(
        orjson.dumps(document), ctx.catalog, max_items=ctx.settings.max_items_per_job
    )
    done = intake.submit(ctx, spec, tenant)
    return Redone(done.job.id, len(items), in_place=False)


def retry_failed(ctx: Context, job: Job, tenant: str) -> Redone:
    """Make the job's failed items again, their prompts unchanged: in place once it finished
    (a retry of its failed items), else as a new job of (at most :data:`MAX_ITEMS` of) them."""
    if job.is_final:
        outcome = retry.retry_job(ctx, job, retry.RetryRequest())
        return Redone(job.id, outcome.retried, in_place=True)
    edits: dict[int, tuple[str, str]] = {}
    for item, line in item_lines(ctx, job, 0):
        if item["status"] == "failed":
            edits[item["index"]] = (item["id"], str(line.body.get("prompt", "")))
            if len(edits) >= MAX_ITEMS:
                break
    return redo(ctx, job, edits, tenant)


def _in_place(ctx: Context, job: Job, edits: Mapping[int, tuple[str, str]]) -> Redone:
    """Retry the items in the job itself with their edited prompts; their images are new, so
    their review decisions are cleared."""
    overrides: dict[str, dict[str, Any]] = {}
    for item_id, prompt in edits.values():
        overrides[item_id] = {"prompt": prompt.strip()} if prompt.strip() else {}
    outcome = retry.retry_job(ctx, job, retry.RetryRequest(items=overrides))
    review.clear(ctx, job, edits)
    return Redone(job.id, outcome.retried, in_place=True)
