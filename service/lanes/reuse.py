"""Completing items from the reuse index instead of upstream: the step both lanes take first.

For each page of items about to go upstream (plan, in the batch lane; a slice, in the sync lane)
:class:`Reuser` computes every item's fingerprint (:mod:`service.jobs.fingerprint`), reading each
``s3://`` / ``file://`` reference once per job through :class:`~service.lanes.items.RefResolver`
(its digest is remembered in Redis), and keeps it for the job: finalize records the job's images
in the index under it. Unless the job says ``"reuse": "never"``, every item whose fingerprint the
tenant's index holds is then completed by copying the stored objects into this job's keys
(:meth:`Storage.copy_many`, a page at a time: server-side on S3, hard links locally with one
directory sync for the page) and marked succeeded at cost 0 with ``reused_from`` (one Lua call
for the page); it never reaches upstream.

At least once: copies go to the item's deterministic keys (a repeat overwrites them) and the
success is recorded by the same exactly-once script as a generated image's, so a plan that runs
twice counts nothing twice. A copy whose source has vanished drops the index entry and leaves
the item to be generated; a reference that cannot be read leaves the item without a fingerprint
(it fails, or not, when it is sent, exactly as without reuse).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from service import metrics
from service.catalog import EDITS
from service.context import Context
from service.jobs import fingerprint as fp
from service.jobs.model import Job
from service.jobs.request import RequestLine
from service.jobs.reuse import Entry, ReuseIndex
from service.lanes.items import BadReference, RefResolver
from service.redis import keys
from service.storage import ObjectNotFound, image_key

log = logging.getLogger("imagebatch.reuse")


class Reuser:
    """Fingerprints a job's items and completes those the tenant already has. One per step."""

    def __init__(self, ctx: Context, job: Job, refs: RefResolver | None = None):
        self.ctx, self.job = ctx, job
        self.refs = refs or RefResolver(ctx, job.id)
        self.index = ReuseIndex.of(ctx, job.tenant)
        self.snapshot = fp.snapshot(ctx.catalog, job.model)

    # --- fingerprints ---------------------------------------------------------------------
    def fingerprints(self, lines: Sequence[RequestLine]) -> list[str | None]:
        """Each item's fingerprint (None when a reference cannot be identified by content);
        recorded for the job as a side effect."""
        ids = self._reference_ids(lines)
        prints: list[str | None] = []
        for line in lines:
            refs = fp.references(line.body) if line.endpoint == EDITS else []
            known = [ident for ref in refs if (ident := ids.get(ref)) is not None]
            if len(known) < len(refs):
                prints.append(None)
                continue
            prints.append(fp.with_identities(line.endpoint, line.body, self.snapshot, known))
        mapping = {str(line.index): p for line, p in zip(lines, prints, strict=True) if p}
        if mapping:
            self.ctx.redis.hset(keys.job_fingerprints(self.job.id), mapping=mapping)
        return prints

    def _reference_ids(self, lines: Sequence[RequestLine]) -> dict[str, str | None]:
        """Identity of every reference of ``lines``: by content where it can be had."""
        ids: dict[str, str | None] = {}
        to_read: list[str] = []
        for line in lines:
            if line.endpoint != EDITS:
                continue
            for ref in fp.references(line.body):
                if ref in ids:
                    continue
                try:
                    ids[ref] = fp.ref_identity(ref)
                except ValueError:
                    ids[ref] = None
                if ids[ref] is None and fp.readable(ref):
                    to_read.append(ref)
        if not to_read:
            return ids
        digests_key = keys.job_ref_digests(self.job.id)
        learned: dict[str, str] = {}
        for ref, known in zip(to_read, self.ctx.redis.hmget(digests_key, to_read), strict=True):
            if known:
                ids[ref] = known.decode()
                continue
            try:
                ids[ref] = learned[ref] = fp.digest(self.refs.read(ref))
            except BadReference:
                ids[ref] = None  # it fails when it is sent, as it would without reuse
        if learned:
            self.ctx.redis.hset(digests_key, mapping=learned)
        return ids

    # --- completing -----------------------------------------------------------------------
    def complete(self, lines: Sequence[RequestLine], chunk: int) -> set[int]:
        """Fingerprint ``lines``; complete those the index holds. Returns their indexes."""
        prints = self.fingerprints(lines)
        if self.job.reuse == "never" or not any(prints):
            return set()
        hits = [
            (line, print_, entry)
            for line, print_, entry in zip(lines, prints, self.index.lookup(prints), strict=True)
            if entry is not None and print_ is not None
        ]
        if not hits:
            return set()
        copied = self._copy(hits)
        records = [
            (line.index, reused_record(entry, stored, chunk), len(stored))
            for (line, _, entry), stored in zip(hits, copied, strict=True)
            if stored is not None
        ]
        counted = self.ctx.store.record_reused(self.job.id, self.job.model, records)
        if counted:
            # After the exactly-once transitions: a crash in between loses a page of counts,
            # never doubles one.
            saved = sum(e.cost_nanousd for line, _, e in hits if line.index in counted)
            labels = {"tenant": self.job.tenant, "model": self.job.model}
            metrics.count(self.ctx.redis, metrics.ITEMS_REUSED, labels, len(counted))
            if saved:
                metrics.count(self.ctx.redis, metrics.REUSE_SAVED_USD, labels, saved / 1e9)
        return {index for index, _, _ in records}

    def _copy(self, hits: Sequence[tuple[RequestLine, str, Entry]]) -> list[list[str] | None]:
        """Copy each hit's objects to its item's keys, all at once; per hit the keys, or None
        when one of its objects has vanished (the entry is dropped; the item is generated)."""
        storage = self.ctx.storage
        wanted: list[list[str]] = []
        pairs: list[tuple[str, str]] = []
        for line, _, entry in hits:
            many = len(entry.keys) > 1
            dsts = [
                image_key(self.job.id, line.id, src.rsplit(".", 1)[-1], k if many else None)
                for k, src in enumerate(entry.keys)
            ]
            wanted.append(dsts)
            # The item's own image (a retried job) is not copied onto itself; it must exist.
            pairs += [(src, dst) for src, dst in zip(entry.keys, dsts, strict=True) if src != dst]
        failed = {
            pair[0]: error
            for pair, error in zip(pairs, storage.copy_many(pairs), strict=True)
            if error is not None
        }
        for error in failed.values():
            if not isinstance(error, ObjectNotFound):
                raise error  # storage trouble, not a vanished image: the task retries
        out: list[list[str] | None] = []
        for (line, print_, entry), dsts in zip(hits, wanted, strict=True):
            gone = any(
                src in failed or (src == dst and not storage.exists(src))
                for src, dst in zip(entry.keys, dsts, strict=True)
            )
            if gone:
                self.index.forget(print_)
                log.info(
                    "job %s item %s: the image of %s/%s to reuse is gone; generating it",
                    self.job.id,
                    line.id,
                    entry.job_id,
                    entry.item_id,
                )
            out.append(None if gone else dsts)
        return out


def reused_record(entry: Entry, stored: list[str], chunk: int) -> dict[str, Any]:
    """An item's usage record when it was completed by reuse: cost 0, where it came from, and
    what making it had cost (the manifest's ``saved_usd``)."""
    return {
        "tokens": {},
        "cost_nanousd": 0,
        "tier": None,
        "keys": stored,
        "chunk": chunk,
        "reused_from": {"job_id": entry.job_id, "item_id": entry.item_id},
        "saved_nanousd": entry.cost_nanousd,
    }
