"""Job, item and chunk state in Redis.

What it owns: every read and write of job state (key layout in :mod:`service.keys`). Item
transitions and spend are Lua scripts so each is atomic: a collect that runs twice, or two
workers racing on one item, can never count an item's usage twice nor move it backwards.

Failure semantics: Redis is the source of truth for state while a job runs; the request itself is
in storage before a job exists here, so losing a worker loses no input. Every method is safe to
call again with the same arguments.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from service.redis import keys

# Item statuses as stored (one letter keeps 50,000-item hashes small).
PENDING, QUEUED, SUCCEEDED, FAILED, CANCELLED = "p", "q", "s", "f", "x"
STATUS_NAMES = {
    PENDING: "pending",
    QUEUED: "queued",
    SUCCEEDED: "succeeded",
    FAILED: "failed",
    CANCELLED: "cancelled",
}
TERMINAL = {SUCCEEDED, FAILED, CANCELLED}

# Job statuses.
JOB_QUEUED, JOB_RUNNING, JOB_CANCELLING = "queued", "running", "cancelling"
JOB_FINAL = ("succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted")

# Chunk statuses. A chunk is one attempt at one upstream batch.
CHUNK_ASSEMBLING = "assembling"  # plan is still adding items
CHUNK_PLANNED = "planned"  # complete, waiting to be submitted
CHUNK_WAITING = "waiting"  # waiting for budget
CHUNK_SUBMITTED = "submitted"  # upstream batch exists
CHUNK_COLLECTING = "collecting"  # upstream batch ended; results being read
CHUNK_DONE = "done"  # every line accounted for
CHUNK_CANCELLED = "cancelled"  # never submitted: the job was cancelled
UPSTREAM_CHUNK_STATES = (CHUNK_SUBMITTED, CHUNK_COLLECTING)

_BATCH = 2000  # items per Redis round trip or Lua call


def _pack(status: str, attempts: int, chunk: int, item_id: str) -> str:
    return f"{status}|{attempts}|{chunk}|{item_id}"


@dataclass(frozen=True, slots=True)
class ItemState:
    index: int
    status: str
    attempts: int
    chunk: int
    id: str

    @classmethod
    def unpack(cls, index: int, raw: bytes | str) -> ItemState:
        text = raw.decode() if isinstance(raw, bytes) else raw
        status, attempts, chunk, item_id = text.split("|", 3)
        return cls(index, status, int(attempts), int(chunk), item_id)


# Moves pending items into a chunk. KEYS: items, counts, chunk items list, chunk hash.
# ARGV: chunk number, then item indexes. Items no longer pending are skipped.
_ASSIGN = """
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, 1) == 'p' then
    local _, _, att, id = string.find(v, '^p|(%d+)|%-?%d+|(.*)$')
    redis.call('HSET', KEYS[1], ARGV[i], 'q|' .. att .. '|' .. ARGV[1] .. '|' .. id)
    redis.call('RPUSH', KEYS[3], ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending', -n)
  redis.call('HINCRBY', KEYS[2], 'queued', n)
  redis.call('HINCRBY', KEYS[4], 'lines', n)
  redis.call('HINCRBY', KEYS[4], 'open', n)
end
return n
"""

# Records a successful item exactly once. KEYS: items, counts, usage, spend, total tokens,
# total cost, total images. ARGV: index, usage JSON, chunk key prefix, tokens/cost field list
# as alternating "hash-index field amount" triples (1=spend, 2=total tokens, 3=total cost,
# 4=total images). Returns 1 when counted now, 0 when it had been counted before.
_SUCCESS = """
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return 0 end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
  local names = {p='pending', q='queued', s='succeeded', f='failed', x='cancelled'}
  if st ~= 's' then
    redis.call('HINCRBY', KEYS[2], names[st], -1)
    redis.call('HINCRBY', KEYS[2], 'succeeded', 1)
    if st == 'q' then redis.call('HINCRBY', ARGV[3] .. ch, 'open', -1) end
  end
  redis.call('HSET', KEYS[1], ARGV[1], 's|' .. att .. '|' .. ch .. '|' .. id)
end
for i = 4, #ARGV, 3 do
  local k = KEYS[3 + tonumber(ARGV[i])]
  redis.call('HINCRBY', k, ARGV[i + 1], ARGV[i + 2])
end
return 1
"""

# Records a failed line for an item still queued in that chunk. KEYS: items, counts, errors,
# chunk hash, total images. ARGV: index, chunk, error JSON, action (retry|fail|cancel),
# max attempts, images label field ("model|failed"), images on failure.
# Returns the item's new status letter, or '' when the line was stale.
_FAILURE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return '' end
local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
if st ~= 'q' or ch ~= ARGV[2] then return '' end
att = tonumber(att) + 1
local new = 'f'
if ARGV[4] == 'retry' and att < tonumber(ARGV[5]) then new = 'p'
elseif ARGV[4] == 'cancel' then new = 'x' end
local names = {p='pending', f='failed', x='cancelled'}
redis.call('HSET', KEYS[1], ARGV[1], new .. '|' .. att .. '|' .. ch .. '|' .. id)
redis.call('HINCRBY', KEYS[2], 'queued', -1)
redis.call('HINCRBY', KEYS[2], names[new], 1)
redis.call('HINCRBY', KEYS[4], 'open', -1)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if new == 'f' then redis.call('HINCRBY', KEYS[5], ARGV[6], tonumber(ARGV[7])) end
return new
"""

# Cancels items that have not reached upstream. KEYS: items, counts, chunk key prefix is ARGV[1].
# ARGV: prefix, then indexes. Pending items, and queued items whose chunk is in the set of
# not-submitted chunks passed as "c:<n>" entries, become cancelled.
_CANCEL = """
local open = {}
local idx = {}
for i = 2, #ARGV do
  if string.sub(ARGV[i], 1, 2) == 'c:' then open[string.sub(ARGV[i], 3)] = true
  else idx[#idx + 1] = ARGV[i] end
end
local n = 0
for _, i in ipairs(idx) do
  local v = redis.call('HGET', KEYS[1], i)
  if v then
    local _, _, st, att, ch, id = string.find(v, '^(%a)|(%d+)|(%-?%d+)|(.*)$')
    if st == 'p' or (st == 'q' and open[ch]) then
      redis.call('HSET', KEYS[1], i, 'x|' .. att .. '|' .. ch .. '|' .. id)
      if st == 'p' then redis.call('HINCRBY', KEYS[2], 'pending', -1)
      else
        redis.call('HINCRBY', KEYS[2], 'queued', -1)
        redis.call('HINCRBY', ARGV[1] .. ch, 'open', -1)
      end
      redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
      n = n + 1
    end
  end
end
return n
"""


class LeaseLost(RuntimeError):
    """Another worker holds this lease now (this holder stalled past its expiry)."""


class Lease:
    """A lock that expires unless its holder renews it: ``SET NX PX`` with a token.

    A worker killed while holding it blocks the guarded step only until the lease lapses, never
    for good. :meth:`refresh` renews on progress (a stalled holder loses the lease, so a hung
    collect is handed to another worker); :meth:`held` renews from a background thread for
    steps whose progress cannot be observed (one long upload).
    """

    _REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
    _DROP = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, client: redis.Redis, key: str, seconds: float):
        self.r, self.key = client, key
        self.token = uuid.uuid4().hex
        self.ms = max(1, int(seconds * 1000))
        self.last = 0.0

    def acquire(self) -> bool:
        self.last = time.monotonic()
        return bool(self.r.set(self.key, self.token, nx=True, px=self.ms))

    def refresh(self, force: bool = False) -> None:
        """Renew (at most every quarter of the lease); raise LeaseLost if someone else has it."""
        if force or time.monotonic() - self.last > self.ms / 4000:
            self.last = time.monotonic()
            if not self.r.eval(self._REFRESH, 1, self.key, self.token, self.ms):
                raise LeaseLost(f"lease {self.key} was lost")

    def release(self) -> None:
        self.r.eval(self._DROP, 1, self.key, self.token)

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Yield whether the lease was taken; while held, a thread renews it."""
        if not self.acquire():
            yield False
            return
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(self.ms / 3000):
                try:
                    self.refresh(force=True)
                except (LeaseLost, redis.RedisError):
                    return

        keeper = threading.Thread(target=keep, name=f"lease:{self.key}", daemon=True)
        keeper.start()
        try:
            yield True
        finally:
            stop.set()
            keeper.join()
            self.release()


def _s(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class JobStore:
    """Reads and writes job state. One per process, sharing the process's Redis client."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._assign = client.register_script(_ASSIGN)
        self._success = client.register_script(_SUCCESS)
        self._failure = client.register_script(_FAILURE)
        self._cancel = client.register_script(_CANCEL)

    # --- jobs -------------------------------------------------------------------------------
    def create_job(self, job_id: str, fields: Mapping[str, Any], item_ids: Iterable[str]) -> None:
        """Record a new job and its items, all pending. Called once intake has stored the request."""
        now = float(fields.get("created_at") or time.time())
        items_key = keys.job_items(job_id)
        count = 0
        pipe = self.r.pipeline(transaction=False)
        batch: dict[str, str] = {}
        for index, item_id in enumerate(item_ids):
            batch[str(index)] = _pack(PENDING, 0, -1, item_id)
            count += 1
            if len(batch) >= _BATCH * 5:
                pipe.hset(items_key, mapping=batch)
                batch = {}
        if batch:
            pipe.hset(items_key, mapping=batch)
        pipe.hset(
            keys.job_counts(job_id),
            mapping={"pending": count, "queued": 0, "succeeded": 0, "failed": 0, "cancelled": 0},
        )
        # The job hash goes last: a job is visible only once its items are.
        pipe.hset(keys.job(job_id), mapping={k: str(v) for k, v in fields.items() if v is not None})
        pipe.zadd(keys.tenant_jobs(str(fields["tenant"])), {job_id: now})
        pipe.sadd(keys.ACTIVE_JOBS, job_id)
        pipe.zadd(keys.METRICS_JOBS, {job_id: "+inf"})
        pipe.execute()

    def job(self, job_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(keys.job(job_id))
        return decode_hash(raw) if raw else None

    def update_job(self, job_id: str, **fields: Any) -> None:
        self.r.hset(keys.job(job_id), mapping={k: str(v) for k, v in fields.items()})

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
        mapping = {k: ("" if v is None else str(v)) for k, v in fields.items()}
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

    def record_success(
        self,
        job_id: str,
        index: int,
        usage: Mapping[str, Any],
        increments: Sequence[tuple[int, str, int]],
    ) -> bool:
        """Mark an item succeeded and add its spend, exactly once.

        ``increments`` are (target, field, amount): target 1 is the job's spend hash, 2 the
        never-expiring token totals, 3 the cost totals, 4 the image totals. Returns False when
        the item had been counted before (a redelivered or repeated collect).
        """
        args: list[Any] = [str(index), orjson.dumps(usage), keys.chunk(job_id, "")]
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
            ],
            args=args,
        )
        return bool(done)

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
        (final) or ``cancel``. Returns the new status letter, or '' when the line was stale
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
                total += int(
                    self._cancel(
                        keys=[keys.job_items(job_id), keys.job_counts(job_id)],
                        args=[keys.chunk(job_id, ""), *chunk_args, *page],
                    )
                )
                page = []
        if page:
            total += int(
                self._cancel(
                    keys=[keys.job_items(job_id), keys.job_counts(job_id)],
                    args=[keys.chunk(job_id, ""), *chunk_args, *page],
                )
            )
        return total

    # --- chunks -----------------------------------------------------------------------------
    def new_chunk(self, job_id: str, fields: Mapping[str, Any]) -> int:
        n = int(self.r.incr(keys.job_chunk_seq(job_id)))
        pipe = self.r.pipeline()
        pipe.hset(
            keys.chunk(job_id, n),
            mapping={
                "status": CHUNK_ASSEMBLING,
                "lines": 0,
                "open": 0,
                "created_at": time.time(),
                **{k: str(v) for k, v in fields.items()},
            },
        )
        pipe.sadd(keys.job_chunks(job_id), n)
        pipe.execute()
        return n

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

    def chunk(self, job_id: str, n: int) -> dict[str, str] | None:
        raw = self.r.hgetall(keys.chunk(job_id, n))
        return decode_hash(raw) if raw else None

    def chunks(self, job_id: str) -> list[int]:
        return sorted(int(c) for c in self.r.smembers(keys.job_chunks(job_id)))

    def update_chunk(self, job_id: str, n: int, **fields: Any) -> None:
        self.r.hset(
            keys.chunk(job_id, n),
            mapping={k: ("" if v is None else str(v)) for k, v in fields.items()},
        )

    def set_chunk_status_if(
        self, job_id: str, n: int, allowed_from: Sequence[str], status: str, **fields: Any
    ) -> bool:
        """Move a chunk to ``status`` only from one of ``allowed_from`` (atomic)."""
        return self._set_status_if(
            keys.chunk(job_id, n), allowed_from, {**fields, "status": status}
        )

    def chunk_indexes(self, job_id: str, n: int) -> Iterator[int]:
        key = keys.chunk_items(job_id, n)
        start = 0
        while True:
            page = self.r.lrange(key, start, start + 4 * _BATCH - 1)
            if not page:
                return
            for v in page:
                yield int(v)
            start += len(page)

    # --- queues for the sweep ---------------------------------------------------------------
    def mark_waiting(self, job_id: str, n: int) -> None:
        self.r.zadd(keys.WAITING_CHUNKS, {f"{job_id}:{n}": time.time()}, nx=True)

    def mark_active(self, job_id: str, n: int) -> None:
        pipe = self.r.pipeline()
        pipe.zadd(keys.ACTIVE_CHUNKS, {f"{job_id}:{n}": time.time()}, nx=True)
        pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{n}")
        pipe.execute()

    def unmark(self, job_id: str, n: int) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{n}")
        pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{n}")
        pipe.execute()

    def waiting_chunks(self) -> list[tuple[str, int]]:
        return [_split_ref(m) for m in self.r.zrange(keys.WAITING_CHUNKS, 0, -1)]

    def active_chunks(self) -> list[tuple[str, int, float]]:
        return [
            (*_split_ref(m), float(s))
            for m, s in self.r.zrange(keys.ACTIVE_CHUNKS, 0, -1, withscores=True)
        ]

    # --- leases -----------------------------------------------------------------------------
    def acquire(self, key: str, seconds: float, token: str = "1") -> bool:
        return bool(self.r.set(key, token, nx=True, px=int(seconds * 1000)))

    def release(self, key: str) -> None:
        self.r.delete(key)

    # --- finishing --------------------------------------------------------------------------
    def finish(self, job_id: str, tenant: str, status: str, **fields: Any) -> None:
        """Final status; drop the per-item keys (the manifest in storage is now the record)."""
        now = time.time()
        chunks = self.chunks(job_id)
        pipe = self.r.pipeline()
        pipe.hset(
            keys.job(job_id),
            mapping={
                "status": status,
                "finished_at": now,
                "updated_at": now,
                **{k: str(v) for k, v in fields.items()},
            },
        )
        pipe.srem(keys.ACTIVE_JOBS, job_id)
        pipe.zadd(keys.METRICS_JOBS, {job_id: now})
        pipe.delete(keys.job_items(job_id), keys.job_usage(job_id), keys.job_errors(job_id))
        for n in chunks:
            pipe.delete(keys.chunk_items(job_id, n))
            pipe.zrem(keys.ACTIVE_CHUNKS, f"{job_id}:{n}")
            pipe.zrem(keys.WAITING_CHUNKS, f"{job_id}:{n}")
        pipe.execute()


def _split_ref(member: bytes | str) -> tuple[str, int]:
    text = member.decode() if isinstance(member, bytes) else member
    job_id, _, n = text.rpartition(":")
    return job_id, int(n)
