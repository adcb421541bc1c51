"""Completing items from the reuse index instead of upstream: the step both lanes take first.

For each page of items about to go upstream (plan, in the batch lane; a slice, in the sync lane)
:class:`Reuser` computes every item's fingerprint (:mod:`service.jobs.fingerprint`), reading each
``s3://`` / ``file://`` reference once per job through :class:`~service.lanes.items.RefResolver`
(its digest is remembered in Redis), and keeps it for the job: finalize records the job's images
in the index under it. Unless the job says ``"reuse": "never"``, every item whose fingerprint the
tenant's index holds is then completed by copying the stored objects into this job's keys
(:meth:`Storage.copy`: server-side on S3, a hard link locally) and marked succeeded at cost 0
with ``reused_from``; it never reaches upstream.

At least once: copies go to the item's deterministic keys (a repeat overwrites them) and the
success is recorded by the same exactly-once script as a generated image's, so a plan that runs
twice counts nothing twice. A copy whose source has vanished drops the index entry and leaves
the item to be generated; a reference that cannot be read leaves the item without a fingerprint
(it fails, or not, when it is sent, exactly as without reuse).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from service import metrics
from service.catalog import EDITS
from service.context import Context
from service.jobs import fingerprint as fp
from service.jobs.model import Job
from service.jobs.request import RequestLine
from service.jobs.reuse import Entry, ReuseIndex
from service.jobs.store import SPEND, TOTAL_IMAGES
from service.lanes.items import BadReference, RefResolver
from service.redis import keys
from service.storage import ObjectNotFound, image_key

log = logging.getLogger("imagebatch.reuse")

# Copies in flight at once: S3 copies are one request each, local ones a link and a directory
# sync; both wait on I/O, not the CPU.
COPY_THREADS = 16


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
        done: set[int] = set()
        threads = min(COPY_THREADS, len(hits))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reuse") as pool:
            results = pool.map(lambda hit: self._one(hit[0], hit[1], hit[2], chunk), hits)
            done.update(index for index in results if index is not None)
        return done

    def _one(self, line: RequestLine, print_: str, entry: Entry, chunk: int) -> int | None:
        stored = self._copy(line, entry)
        if stored is None:
            self.index.forget(print_)
            log.info(
                "job %s item %s: reusable image of %s/%s is gone; generating it",
                self.job.id,
                line.id,
                entry.job_id,
                entry.item_id,
            )
            return None
        record_reused(self.ctx, self.job, chunk, line.index, entry, stored)
        return line.index

    def _copy(self, line: RequestLine, entry: Entry) -> list[str] | None:
        """Copy the entry's objects to this item's keys; None when one of them has vanished."""
        storage = self.ctx.storage
        stored: list[str] = []
        many = len(entry.keys) > 1
        try:
            for k, src in enumerate(entry.keys):
                dst = image_key(self.job.id, line.id, src.rsplit(".", 1)[-1], k if many else None)
                if dst == src:
                    # The item's own image (a retried job): nothing to copy, but it must exist.
                    if not storage.exists(src):
                        return None
                else:
                    storage.copy(src, dst)
                stored.append(dst)
        except ObjectNotFound:
            return None
        return stored


def record_reused(
    ctx: Context, job: Job, chunk: int, index: int, entry: Entry, stored: list[str]
) -> bool:
    """Mark an item succeeded by reuse, exactly once: cost 0, ``reused_from`` in its record,
    and counted as ``reused`` in the job's spend hash (what its counts show)."""
    record = {
        "tokens": {},
        "cost_nanousd": 0,
        "tier": None,
        "keys": stored,
        "chunk": chunk,
        "reused_from": {"job_id": entry.job_id, "item_id": entry.item_id},
        "saved_nanousd": entry.cost_nanousd,
    }
    increments = [
        (SPEND, "images", len(stored)),
        (SPEND, "reused", 1),
        (TOTAL_IMAGES, f"{job.model}|reused", len(stored)),
    ]
    counted = ctx.store.record_success(job.id, index, record, increments)
    if counted:
        labels = {"tenant": job.tenant, "model": job.model}
        # After the exactly-once transition: a crash in between loses one count, never doubles.
        metrics.count(ctx.redis, metrics.ITEMS_REUSED, labels)
        if entry.cost_nanousd:
            metrics.count(ctx.redis, metrics.REUSE_SAVED_USD, labels, entry.cost_nanousd / 1e9)
    return counted
