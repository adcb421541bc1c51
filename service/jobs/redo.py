"""Redo: make some of a job's images again, each with an edited prompt.

The console's gallery calls :func:`redo` for the items a reviewer rejected (or that failed), and
a job's page :func:`retry_failed` for all its failed items, prompts unchanged. The
items are submitted again through intake (the one way in: validated, estimated, budget-checked)
as a new job of those items alone: the same model, parameters and labels, the edited prompts,
and the label ``redo_of`` naming the job they come from. Each redone item's review decision in
the original job is kept and records the job that redoes it (``redo`` in its review record), so
the gallery can show the new image in its place.

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
from service.jobs import intake
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
    """Make the items ``edits`` names (index -> (id, new prompt)) again."""
    errs = FieldErrors()
    if not edits or len(edits) > MAX_ITEMS:
        errs.add("items", f"choose 1 to {MAX_ITEMS:,} items to redo")
        errs.raise_if_any()
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
    """Make the job's failed items again, their prompts unchanged (at most :data:`MAX_ITEMS`)."""
    edits: dict[int, tuple[str, str]] = {}
    for item, line in item_lines(ctx, job, 0):
        if item["status"] == "failed":
            edits[item["index"]] = (item["id"], str(line.body.get("prompt", "")))
            if len(edits) >= MAX_ITEMS:
                break
    return redo(ctx, job, edits, tenant)
