"""Review: approving or rejecting a job's images, each decision with an optional note.

``POST /v1/jobs/{id}/review`` and the console's gallery both call :func:`review`. A body names
items by the caller's id: ``{"items": [{"id": "sku-7", "decision": "rejected", "note": "…"}]}``.
Only an item with an image (succeeded) can be reviewed; a decision can be changed, and
``"decision": null`` clears it. Decisions live in Redis (``keys.job_review``), kept after the job
finishes like the job itself; the per-decision counts beside them are kept exact by one Lua
script (``review_set.lua``), however often a call is repeated. Items pages, the manifest served
by the API and the manifest written when a job finishes all carry each item's decision.

Finding an item by id reads the job's items in order until every id is found; a caller that
knows the index (the console does) passes it as a hint, and the item is read there directly and
its id checked. Failure semantics: a bad body or an item that cannot be reviewed is a 422
:class:`Problem` naming ``items[k]`` and the item's id, and nothing is written; Redis and
storage errors propagate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from service.context import Context
from service.errors import FieldErrors, Problem, malformed
from service.jobs.model import Job
from service.jobs.pages import item_lines

DECISIONS = ("approved", "rejected")
FILTERS = (*DECISIONS, "unreviewed")
MAX_ITEMS = 1000  # decisions in one call
MAX_NOTE_CHARS = 2000
_LETTER = {"approved": "a", "rejected": "r"}


@dataclass(frozen=True)
class Decision:
    """One item's decision (None clears it); ``index`` is a hint where the item is."""

    id: str
    decision: str | None
    note: str | None = None
    index: int | None = None


def parse_review_body(body: bytes | bytearray) -> list[Decision]:
    """``{"items": [{"id", "decision", "note"?}, ...]}``; a 400/422 naming the field if wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise malformed(f"The body is not valid JSON: {exc.msg}") from None
    errs = FieldErrors()
    raw = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not raw:
        errs.add("items", "items must be a non-empty array of {id, decision, note}")
        _raise(errs)
    assert isinstance(raw, list)
    if len(raw) > MAX_ITEMS:
        errs.add("items", f"at most {MAX_ITEMS:,} items per call, not {len(raw):,}")
        _raise(errs)
    out = [_decision(k, entry, errs) for k, entry in enumerate(raw)]
    _raise(errs)
    return [d for d in out if d is not None]


def _decision(k: int, entry: Any, errs: FieldErrors) -> Decision | None:
    where = f"items[{k}]"
    if not isinstance(entry, dict):
        errs.add(where, "an item must be an object {id, decision, note}", k)
        return None
    unknown = set(entry) - {"id", "decision", "note"}
    item_id = entry.get("id")
    if not isinstance(item_id, str) or not item_id:
        errs.add(f"{where}.id", "id is required: the id of an item of this job", k)
        return None
    for name in sorted(unknown)[:3]:
        errs.add(f"{where}.{name[:64]}", "unknown field; an item takes id, decision, note", k)
    decision = entry.get("decision")
    if decision is not None and decision not in DECISIONS:
        errs.add(f"{where}.decision", "decision must be 'approved', 'rejected' or null", k, item_id)
    note = entry.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        errs.add(
            f"{where}.note", f"note must be text of at most {MAX_NOTE_CHARS} chars", k, item_id
        )
    return Decision(item_id[:128], decision, note or None)


def _raise(errs: FieldErrors) -> None:
    if errs:
        kept = list(errs)
        raise Problem(
            422,
            "The review is not valid",
            kept[0].sentence(),
            errors=kept,
            extra={"errors_omitted": errs.count - len(kept)} if errs.count > len(kept) else None,
        )


def _locate(ctx: Context, job: Job, wanted: list[Decision]) -> dict[str, dict[str, Any]]:
    """The items the decisions name, by id: read at their hinted index, else found in order."""
    found: dict[str, dict[str, Any]] = {}
    for d in wanted:
        if d.index is not None and 0 <= d.index < job.items:
            item, _ = next(item_lines(ctx, job, d.index), ({}, None))
            if item.get("id") == d.id:
                found[d.id] = item
    missing = {d.id for d in wanted} - set(found)
    if missing:
        for item, _ in item_lines(ctx, job, 0):
            if item["id"] in missing:
                found[item["id"]] = item
                missing.discard(item["id"])
                if not missing:
                    break
    return found


def review(ctx: Context, job: Job, decisions: Iterable[Decision]) -> dict[str, Any]:
    """Record the decisions (all or none); returns how many changed and the job's counts."""
    wanted = list(decisions)
    found = _locate(ctx, job, wanted)
    errs = FieldErrors()
    values: dict[int, str] = {}
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    for k, d in enumerate(wanted):
        item = found.get(d.id)
        if item is None:
            errs.add(f"items[{k}].id", f"job {job.id} has no item '{d.id}'", k, d.id)
        elif item["status"] != "succeeded":
            errs.add(
                f"items[{k}].id",
                f"item '{d.id}' has no image to review (it is {item['status']})",
                k,
                d.id,
            )
        elif d.decision is None:
            values[item["index"]] = ""
        else:
            record = {"id": d.id, "decision": d.decision, "note": d.note, "at": at}
            values[item["index"]] = f"{_LETTER[d.decision]}|" + orjson.dumps(record).decode()
    _raise(errs)
    changed = ctx.store.set_reviews(job.id, values)
    return {"reviewed": len(values), "changed": changed}


def clear(ctx: Context, job: Job, indexes: Iterable[int]) -> int:
    """Forget the decisions of these items (their images are being made again)."""
    return ctx.store.set_reviews(job.id, dict.fromkeys(indexes, ""))


def note_redo(ctx: Context, job: Job, indexes: Iterable[int], redo_job: str) -> None:
    """Record on each item's decision that ``redo_job`` makes its image again."""
    wanted = sorted(set(indexes))
    values = {}
    for index, record in zip(wanted, ctx.store.item_reviews(job.id, wanted), strict=True):
        if record is not None and record.get("decision") in _LETTER:
            record["redo"] = redo_job
            values[index] = f"{_LETTER[record['decision']]}|" + orjson.dumps(record).decode()
    ctx.store.set_reviews(job.id, values)
