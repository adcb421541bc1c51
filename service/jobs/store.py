"""Job, item and chunk state in Redis: every read and write of it goes through :class:`JobStore`.

Item transitions and spend are Lua scripts (``service/redis/scripts/item_*.lua``) so each is
atomic: a collect that runs twice, or two workers racing on one item, can never count an item's
usage twice nor move it backwards. Job and chunk status changes are compare-and-set.

Failure semantics: Redis is the source of truth for state while a job runs; the request itself is
in storage before a job exists here, so losing a worker loses no input. Every method is safe to
call again with the same arguments; Redis errors propagate (the caller's task retries).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson
import redis

from service.jobs.model import (
    CHUNK_ASSEMBLING,
    CHUNK_SYNC,
    NO_CHUNK,
    PENDING,
    QUEUED,
    Chunk,
    ItemState,
    Job,
    pack_item,
    split_ref,
)
from service.redis import keys, lua

_BATCH = 2000  # items per Redis round trip or Lua call
# Items per round trip when a job is recorded: intake holds each round trip's items as Python
# strings (about 170 bytes an item), so fewer, to keep a job of tiny items within its body's size.
_CREATE_BATCH = 500
# How long a batch id -> chunk entry is kept: the completion window (24 h), OpenAI's 72 h of
# webhook retries after it ends, and slack.
BATCH_INDEX_SECONDS = 7 * 86400
# Targets of record_success's increments.
SPEND, TOTAL_TOKENS, TOTAL_COST, TOTAL_IMAGES = 1, 2, 3, 4
DAILY = 5  # the tenant's spend of the day (keys.tenant_spend_daily)


def _s(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _strings(fields: Mapping[str, Any]) -> dict[str | bytes, str | bytes]:
    """Hash fields as stored: None is written as '' (absent)."""
    return {k: ("" if v is None else str(v)) for k, v in fields.items()}


class JobStore:
    """Reads and writes job state. One per process, sharing the process's Redis client."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._assign = lua.script(client, "items_assign")
        self._success = lua.script(client, "item_succeeded")
        self._failure = lua.script(client, "item_failed")
        self._cancel = lua.script(client, "items_cancel")
        self._move = lua.script(client, "items_move")
        self._review = lua.script(client, "review_set")
        self._reused = lua.script(client, "items_reused")
        self._close = lua.script(client, "chunk_close")

    # --- jobs -------------------------------------------------------------------------------
    def create_job(self, job: Job, item_ids: Iterable[str]) -> None:
        """Record a new job and its items, all pending. Called once intake has stored the request."""
        items_key = keys.job_items(job.id)
        count = 0
        pipe = self.r.pipeline(transaction=False)
        batch: dict[str, str] = {}
        for index, item_id in enumerate(item_ids):
            batch[str(index)] = pack_item(PENDING, 0, NO_CHUNK, item_id)
            count += 1
            if len(batch) >= _CREATE_BATCH:
                pipe.hset(items_key, mapping=batch)
                # Sent now, not all at the end: a 100k-item job never sits packed in memory
                # whole. Nobody reads the items before the job hash below exists.
                pipe.execute()
                batch = {}
        if batch:
            pipe.hset(items_key, mapping=batch)
        pipe.hset(
            keys.job_counts(job.id),
            mapping={"pending": count, "queued": 0, "succeeded": 0, "failed": 0, "cancelled": 0},
        )
        # The job hash goes last: a job is visible only once its items are.
        pipe.hset(keys.job(job.id), mapping=job.to_hash())
        pipe.zadd(keys.tenant_jobs(job.tenant), {job.id: job.created_at})
        pipe.sadd(keys.ACTIVE_JOBS, job.id)
        pipe.zadd(keys.METRICS_JOBS, {job.id: "+inf"})
        pipe.execute()

    def job(self, job_id: str) -> Job | None:
        raw = self.r.hgetall(keys.job(job_id))
        return Job.from_hash(decode_hash(raw)) if raw else None

    def job_status(self, job_id: str) -> str | None:
        return _s(self.r.hget(keys.job(job_id), "status"))

    def job_mode(self, job_id: str) -> str | None:
        """The lane the job runs on now (``batch`` or ``sync``)."""
        return _s(self.r.hget(keys.job(job_id), "mode"))

    def stop_for_budget(self, job_id: str, reason: str) -> None:
        """The job may not spend more: nothing more is submitted, and it ends budget_exhausted."""
        self.r.hset(keys.job(job_id), mapping={"budget_exhausted": "1", "reason": reason})

    def set_job_status_if(
        self, job_id: str, allowed_from: Sequence[str], status: str, **fields: Any
    ) -> bool:
        """Set the job's status only if it is currently one of ``allowed_from`` (atomic)."""
        return self._set_status_if(
            keys.job(job_id), allowed_from, {"updated_at": time.time(), **fields, "status": status}
        )

    def _set_status_if(
        self, key: str, allowed_from: Sequence[str], fields: Mapping[str, Any]
    ) -> bool:
        """Compare-and-set on a hash's ``status``: write ``fields`` only from an allowed status."""
        mapping = _strings(fields)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if _s(pipe.hget(key, "status")) not in allowed_from:
                        pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping=mapping)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def counts(self, job_id: str) -> dict[str, int]:
        raw = self.r.hgetall(keys.job_counts(job_id))
        return {k.decode(): int(v) for k, v in raw.items()}

    def spend(self, job_id: str) -> dict[str, int]:
        raw = self.r.hgetall(keys.job_spend(job_id))
        return {k.decode(): int(v) for k, v in raw.items()}

    def list_jobs(
        self, tenant: str, *, before: float | None = None, limit: int = 50
    ) -> list[tuple[str, float]]:
        """Job ids of a tenant, newest first, created strictly before ``before``."""
        top = f"({before}" if before is not None else "+inf"
        rows = self.r.zrevrangebyscore(
            keys.tenant_jobs(tenant), top, "-inf", start=0, num=limit, withscores=True
        )
        return [(k.decode(), float(s)) for k, s in rows]

    def active_jobs(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(keys.ACTIVE_JOBS))

    def forget_active(self, job_id: str) -> None:
        self.r.srem(keys.ACTIVE_JOBS, job_id)

    # --- items ------------------------------------------------------------------------------
    def item_states(self, job_id: str, indexes: Sequence[int]) -> list[ItemState | None]:
        if not indexes:
            return []
        raw = self.r.hmget(keys.job_items(job_id), [str(i) for i in indexes])
        return [
            ItemState.unpack(i, v) if v is not None else None
            for i, v in zip(indexes, raw, strict=True)
        ]

    def scan_items(self, job_id: str) -> Iterator[ItemState]:
        """Every item's state, in no particular order, a page at a time."""
        for field, value in self.r.hscan_iter(keys.job_items(job_id), count=_BATCH):
            yield ItemState.unpack(int(field), value)

    def item_usage(self, job_id: str, indexes: Sequence[int]) -> list[dict[str, Any] | None]:
        raw = self.r.hmget(keys.job_usage(job_id), [str(i) for i in indexes])
        return [orjson.loads(v) if v else None for v in raw]

    def item_errors(self, job_id: str, indexes: Sequence[int]) -> list[dict[str, Any] | None]:
        raw = self.r.hmget(keys.job_errors(job_id), [str(i) for i in indexes])
        return [orjson.loads(v) if v else None for v in raw]

    def item_reviews(self, job_id: str, indexes: Sequence[int]) -> list[dict[str, Any] | None]:
        """The items' review decisions ({id, decision, note, at}), None where there is none."""
        if not indexes:
            return []
        raw = self.r.hmget(keys.job_review(job_id), [str(i) for i in indexes])
        return [orjson.loads(v[2:]) if v else None for v in raw]

    def set_reviews(self, job_id: str, values: Mapping[int, str]) -> int:
        """Write review values (index -> "a|json" approved, "r|json" rejected, "" cleared) and
        keep the per-decision counts exact; returns how many items changed decision."""
        args: list[Any] = []
        for index, value in values.items():
            args += [str(index), value]
        if not args:
            return 0
        return int(
            self._review(keys=[keys.job_review(job_id), keys.job_review_counts(job_id)], args=args)
        )

    def review_counts(self, job_id: str) -> dict[str, int]:
        raw = self.r.hgetall(keys.job_review_counts(job_id))
        return {k.decode(): int(v) for k, v in raw.items()}

    def item_fingerprints(self, job_id: str, indexes: Sequence[int]) -> list[str | None]:
        """The items' reuse fingerprints (service.lanes.reuse), None where none was taken."""
        if not indexes:
            return []
        raw = self.r.hmget(keys.job_fingerprints(job_id), [str(i) for i in indexes])
        return [v.decode() if v else None for v in raw]

    def record_success(
        self,
        job_id: str,
        index: int,
        usage: Mapping[str, Any],
        increments: Sequence[tuple[int, str, int]],
        daily_key: str | None = None,
    ) -> bool:
        """Mark an item succeeded and add its spend, exactly once.

        ``increments`` are (target, field, amount), target one of :data:`SPEND` (the job's spend
        hash), :data:`TOTAL_TOKENS`, :data:`TOTAL_COST` and :data:`TOTAL_IMAGES` (the
        never-expiring totals), or :data:`DAILY` (``daily_key``: the tenant's spend of the day,
        kept ``keys.DAILY_SPEND_TTL_SECONDS``). Returns False when the item had been counted
        before (a redelivered or repeated collect).
        """
        args: list[Any] = [
            str(index),
            orjson.dumps(usage),
            keys.chunk(job_id, ""),
            keys.DAILY_SPEND_TTL_SECONDS,
        ]
        for target, field, amount in increments:
            args += [target, field, amount]
        done = self._success(
            keys=[
                keys.job_items(job_id),
                keys.job_counts(job_id),
                keys.job_usage(job_id),
                keys.job_spend(job_id),
                keys.TOTAL_TOKENS,
                keys.TOTAL_COST,
                keys.TOTAL_IMAGES,
                # Unused unless a DAILY increment is given (a key the script never touches).
                daily_key or keys.job_spend(job_id),
            ],
            args=args,
        )
        return bool(done)

    def record_reused(
        self, job_id: str, model: str, records: Sequence[tuple[int, Mapping[str, Any], int]]
    ) -> set[int]:
        """Mark items succeeded by reuse, each exactly once: (index, usage record, images).

        Like :meth:`record_success` with no tokens or cost, for a page of items in one call;
        the job's spend hash counts their images and ``reused``. Returns the indexes counted
        now (the rest had been counted before: a repeated plan).
        """
        counted: set[int] = set()
        for start in range(0, len(records), _BATCH):
            args: list[Any] = [keys.chunk(job_id, ""), f"{model}|reused"]
            for index, usage, images in records[start : start + _BATCH]:
                args += [str(index), orjson.dumps(usage), images]
            done = self._reused(
                keys=[
                    keys.job_items(job_id),
                    keys.job_counts(job_id),
                    keys.job_usage(job_id),
                    keys.job_spend(job_id),
                    keys.TOTAL_IMAGES,
                ],
                args=args,
            )
            counted.update(int(i) for i in done)
        return counted

    def record_failure(
        self,
        job_id: str,
        index: int,
        chunk: int,
        error: Mapping[str, Any],
        action: str,
        max_attempts: int,
        model: str,
        images: int,
    ) -> str:
        """Record a failed line for an item queued in ``chunk``.

        ``action`` is ``retry`` (back to pending while attempts remain, else failed), ``fail``
        (final), ``cancel``, or ``requeue`` (back to pending, no attempt counted: a line we
        stopped ourselves, e.g. a batch cancelled to make a deadline). Returns the new status letter, or '' when the line was stale
        (the item had moved on: already recorded, or resubmitted in a later chunk).
        """
        result = self._failure(
            keys=[
                keys.job_items(job_id),
                keys.job_counts(job_id),
                keys.job_errors(job_id),
                keys.chunk(job_id, chunk),
                keys.TOTAL_IMAGES,
            ],
            args=[
                str(index),
                str(chunk),
                orjson.dumps(error),
                action,
                max_attempts,
                f"{model}|failed",
                images,
            ],
        )
        return _s(result) or ""

    def cancel_unsubmitted(self, job_id: str, open_chunks: Iterable[int]) -> int:
        """Cancel pending items and items in chunks that never reached upstream."""
        chunk_args = [f"c:{c}" for c in open_chunks]
        total = 0
        page: list[str] = []
        for state in self.scan_items(job_id):
            if state.status in (PENDING, QUEUED):
                page.append(str(state.index))
            if len(page) >= _BATCH:
                total += self._cancel_page(job_id, chunk_args, page)
                page = []
        if page:
            total += self._cancel_page(job_id, chunk_args, page)
        return total

    def _cancel_page(self, job_id: str, chunk_args: list[str], page: list[str]) -> int:
        return int(
            self._cancel(
                keys=[keys.job_items(job_id), keys.job_counts(job_id)],
                args=[keys.chunk(job_id, ""), *chunk_args, *page],
            )
        )

    # --- retry in place (service.jobs.retry) ---------------------------------------------------
    def drop_items(self, job_id: str) -> None:
        """Forget per-item state (what a finished job left behind is rebuilt from its manifest)."""
        self.r.delete(
            keys.job_items(job_id),
            keys.job_usage(job_id),
            keys.job_errors(job_id),
            keys.job_fingerprints(job_id),
        )

    def restore_items(
        self,
        job_id: str,
        states: Mapping[str, str],
        usage: Mapping[str, bytes],
        errors: Mapping[str, bytes],
        prints: Mapping[str, str],
    ) -> None:
        """Write back a page of item states, usage records, errors and fingerprints."""
        pipe = self.r.pipeline(transaction=False)
        for key, mapping in (
            (keys.job_items(job_id), states),
            (keys.job_usage(job_id), usage),
            (keys.job_errors(job_id), errors),
            (keys.job_fingerprints(job_id), prints),
        ):
            if mapping:
                pipe.hset(key, mapping=dict(mapping))
        pipe.execute()

    def set_counts(self, job_id: str, counts: Mapping[str, int]) -> None:
        self.r.hset(keys.job_counts(job_id), mapping=dict(counts))

    def reopen(self, job_id: str) -> None:
        """A finished job runs again: the sweep and the per-job metrics see it as running."""
        pipe = self.r.pipeline()
        pipe.sadd(keys.ACTIVE_JOBS, job_id)
        pipe.zadd(keys.METRICS_JOBS, {job_id: "+inf"})
        pipe.execute()

    # --- chunks -----------------------------------------------------------------------------
    def new_chunk(self, job_id: str, **fields: Any) -> int:
        """A new chunk, assembling, with ``fields``; returns its number."""
        number = int(self.r.incr(keys.job_chunk_seq(job_id)))
        pipe = self.r.pipeline()
        pipe.hset(
            keys.chunk(job_id, number),
            mapping=_strings(
                {"status": CHUNK_ASSEMBLING, "lines": 0, "open": 0, "created_at": time.time()}
                | fields
            ),
        )
        pipe.sadd(keys.job_chunks(job_id), number)
        pipe.execute()
        return number

    def ensure_chunk(self, job_id: str, number: int, **fields: Any) -> None:
        """Create chunk ``number`` with ``fields`` unless it exists (a sync job's chunk 0)."""
        if self.r.exists(keys.chunk(job_id, number)):
            return
        pipe = self.r.pipeline()
        pipe.hset(keys.chunk(job_id, number), mapping=_strings(fields))
        pipe.sadd(keys.job_chunks(job_id), number)
        pipe.execute()

    def ensure_sync_chunk(self, job_id: str, number: int) -> None:
        self.ensure_chunk(
            job_id, number, status=CHUNK_SYNC, endpoint="", lines=0, open=0, attempt=1
        )

    def assign(self, job_id: str, chunk: int, indexes: Sequence[int]) -> int:
        """Move still-pending items into ``chunk``; returns how many moved."""
        moved = 0
        for start in range(0, len(indexes), _BATCH):
            part = indexes[start : start + _BATCH]
            moved += int(
                self._assign(
                    keys=[
                        keys.job_items(job_id),
                        keys.job_counts(job_id),
                        keys.chunk_items(job_id, chunk),
                        keys.chunk(job_id, chunk),
                    ],
                    args=[chunk, *part],
                )
            )
        return moved

    def move(self, job_id: str, source: int, target: int, indexes: Sequence[int]) -> list[int]:
        """Move items still queued in chunk ``source`` into chunk ``target`` (which exists);
        returns the indexes moved. Each item moves once however often this runs."""
        moved: list[int] = []
        for start in range(0, len(indexes), _BATCH):
            part = indexes[start : start + _BATCH]
            moved += [
                int(i)
                for i in self._move(
                    keys=[
                        keys.job_items(job_id),
                        keys.chunk_items(job_id, target),
                        keys.chunk(job_id, target),
                        keys.chunk(job_id, source),
                    ],
                    args=[source, target, *part],
                )
            ]
        return moved

    def switch_to_sync(self, job_id: str, reason: str | None = None) -> None:
        """From now on the job runs on the sync lane (``reason``: why, for the job's lanes
        report: its model cannot be batched, or its deadline)."""
        now = str(time.time())
        fields = {"mode": "sync", "updated_at": now}
        if reason is not None:
            fields |= {"lane_reason": reason, "switched_at": now}
        self.r.hset(keys.job(job_id), mapping=fields)

    def chunk_of_batch(self, batch_id: str) -> tuple[str, int] | None:
        """The chunk an upstream batch was created for, if it is one of ours and recent."""
        raw = self.r.get(keys.batch_chunk(batch_id))
        return split_ref(raw) if raw else None

    def chunk(self, job_id: str, number: int) -> Chunk | None:
        raw = self.r.hgetall(keys.chunk(job_id, number))
        return Chunk.from_hash(job_id, number, decode_hash(raw)) if raw else None

    def chunks(self, job_id: str) -> list[int]:
        return sorted(int(c) for c in self.r.smembers(keys.job_chunks(job_id)))

    def job_chunks(self, job_id: str) -> Iterator[Chunk]:
        for number in self.chunks(job_id):
            chunk = self.chunk(job_id, number)
            if chunk is not None:
                yield chunk

    def update_chunk(self, job_id: str, number: int, **fields: Any) -> None:
        self.r.hset(keys.chunk(job_id, number), mapping=_strings(fields))

    def set_chunk_status_if(
        self, job_id: str, number: int, allowed_from: Sequence[str], status: str, **fields: Any
    ) -> bool:
        """Move a chunk to ``status`` only from one of ``allowed_from`` (atomic)."""
        return self._set_status_if(
            keys.chunk(job_id, number), allowed_from, {**fields, "status": status}
        )

    def chunk_indexes(self, job_id: str, number: int) -> Iterator[int]:
        key = keys.chunk_items(job_id, number)
        start = 0
        while True:
            page = self.r.lrange(key, start, start + 4 * _BATCH - 1)
            if not page:
                return
            for v in page:
                yield int(v)
            start += len(page)

    def close_chunk(self, job_id: str, number: int) -> bool:
        """An assembling chunk is complete: planned and on the waiting set in one atomic step
        (a planned or waiting chunk is put back on the set). False if it had moved on."""
        ref = f"{job_id}:{number}"
        return bool(
            self._close(
                keys=[keys.chunk(job_id, number), keys.WAITING_CHUNKS], args=[ref, time.time()]
            )
        )

    def chunk_watch(self, job_id: str, numbers: Sequence[int]) -> list[tuple[str, int, bool]]:
        """For each chunk: its status, its open lines, and whether the sweep watches it (it is on
        the waiting or the active set). One round trip."""
        pipe = self.r.pipeline(transaction=False)
        for n in numbers:
            pipe.hmget(keys.chunk(job_id, n), ["status", "open"])
            pipe.zscore(keys.WAITING_CHUNKS, f"{job_id}:{n}")
            pipe.zscore(keys.ACTIVE_CHUNKS, f"{job_id}:{n}")
        raw = pipe.execute()
        out = []
        for i in range(0, len(raw), 3):
            status, open_lines = raw[i]
            out.append(
                (
                    _s(status) or "",
                    int(open_lines or 0),
                    raw[i + 1] is not None or raw[i + 2] is not None,
                )
            )
        return out

    # --- what the sweep watches -------------------------------------------------------------
    def mark_waiting(self, job_id: str, number: int) -> None:
        self.r.zadd(keys.WAITING_CHUNKS, {f"{job_id}:{number}": time.time()}, nx=True)

    def mark_active(self, job_id: str, number: int) -> None:
        pipe = self.r.pipeline()
        pipe.zadd(keys.ACTIVE_CHUNKS, {f"{job_id}:{number}": time.time()}, nx=True)
        pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{number}")
        pipe.execute()

    def unmark_active(self, job_id: str, number: int) -> None:
        self.r.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{number}")

    def unmark(self, job_id: str, number: int) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{number}")
        pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{number}")
        pipe.execute()

    def waiting_chunks(self, limit: int = -1) -> list[tuple[str, int]]:
        """Chunks waiting to be submitted, longest-waiting first (``limit`` of them, -1 = all)."""
        end = -1 if limit < 0 else limit - 1
        return [split_ref(m) for m in self.r.zrange(keys.WAITING_CHUNKS, 0, end)]

    def oldest_wait(self) -> float | None:
        """When the longest-waiting chunk started waiting (unix seconds), None if none waits."""
        rows = self.r.zrange(keys.WAITING_CHUNKS, 0, 0, withscores=True)
        return float(rows[0][1]) if rows else None

    def active_chunks(self) -> list[tuple[str, int, float]]:
        return [
            (*split_ref(m), float(s))
            for m, s in self.r.zrange(keys.ACTIVE_CHUNKS, 0, -1, withscores=True)
        ]

    # --- finishing --------------------------------------------------------------------------
    def finish(self, job_id: str, tenant: str, status: str, **fields: Any) -> None:
        """Final status; drop the per-item keys (the manifest in storage is now the record)."""
        now = time.time()
        chunks = self.chunks(job_id)
        pipe = self.r.pipeline()
        pipe.hset(
            keys.job(job_id),
            mapping=_strings({"status": status, "finished_at": now, "updated_at": now} | fields),
        )
        pipe.srem(keys.ACTIVE_JOBS, job_id)
        pipe.zadd(keys.METRICS_JOBS, {job_id: now})
        pipe.delete(keys.job_items(job_id), keys.job_usage(job_id), keys.job_errors(job_id))
        pipe.delete(keys.job_fingerprints(job_id), keys.job_ref_digests(job_id))
        for number in chunks:
            pipe.delete(keys.chunk_items(job_id, number))
            pipe.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{number}")
            pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{number}")
        pipe.execute()
