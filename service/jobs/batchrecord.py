"""A chunk's upstream batch as Redis records it: written only under the submit lease, and the
duplicates a create of unknown outcome may have left upstream.

A submitter writes ``create_started`` and ``batch_id`` with a compare-and-set on its lease's token
(``service/redis/scripts/chunk_create_begin.lua`` and ``chunk_batch_record.lua``): one that lost
its lease (paused, or cut off from Redis past the lease) writes nothing, and no chunk ever has
its batch id overwritten. A batch created for a chunk that has another is a *duplicate*: it is
kept in the job's duplicates hash (``open`` until what it billed is added to the job, then that
record) and on the set the sweep watches until it is cancelled and accounted.

Failure semantics: Redis errors propagate (the caller's task retries); every write is idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis

from service.jobs.store import BATCH_INDEX_SECONDS
from service.redis import keys, lua

# Targets of :meth:`BatchRecord.account_duplicate`'s increments.
SPEND, TOTAL_TOKENS, TOTAL_COST, DAILY = 1, 2, 3, 4


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class BatchRecord:
    """Lease-guarded writes of a chunk's batch, and the duplicates found."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._begin = lua.script(client, "chunk_create_begin")
        self._record = lua.script(client, "chunk_batch_record")
        self._accounted = lua.script(client, "duplicate_accounted")

    # --- the chunk's one batch ------------------------------------------------------------
    def begin_create(self, job_id: str, number: int, lease_key: str, token: str, now: float) -> int:
        """Record that a create is about to be sent: 1 done, 0 the lease is not ours, -1 the
        chunk has a batch already."""
        return int(
            self._begin(keys=[lease_key, keys.chunk(job_id, number)], args=[token, repr(now)])
        )

    def record(self, job_id: str, number: int, batch_id: str, lease_key: str, token: str) -> str:
        """Make ``batch_id`` the chunk's batch: ``ok``, ``lease`` (not ours: nothing written) or
        the id of the other batch the chunk already has (nothing written)."""
        return _s(
            self._record(
                keys=[lease_key, keys.chunk(job_id, number), keys.batch_chunk(batch_id)],
                args=[token, batch_id, f"{job_id}:{number}", BATCH_INDEX_SECONDS],
            )
        )

    # --- duplicates -----------------------------------------------------------------------
    def add_duplicate(self, job_id: str, number: int, batch_id: str) -> bool:
        """Remember a duplicate batch of the chunk; True when it was not known before."""
        if not self.r.hsetnx(keys.job_duplicates(job_id), batch_id, "open"):
            return False
        self.r.zadd(keys.DUPLICATE_BATCHES, {f"{job_id}:{number}:{batch_id}": _now(self.r)})
        return True

    def open_duplicates(self) -> list[tuple[str, int, str]]:
        """(job id, chunk, batch id) of every duplicate still to cancel and account."""
        out = []
        for member in self.r.zrange(keys.DUPLICATE_BATCHES, 0, -1):
            job_id, number, batch_id = _s(member).rsplit(":", 2)  # type: ignore[arg-type]
            out.append((job_id, int(number), batch_id))
        return out

    def job_has_open_duplicates(self, job_id: str) -> bool:
        return any(v == b"open" for v in self.r.hvals(keys.job_duplicates(job_id)))

    def duplicates(self, job_id: str) -> dict[str, dict[str, Any] | None]:
        """The job's duplicate batches: id -> what it billed, or None while still open."""
        raw = self.r.hgetall(keys.job_duplicates(job_id))
        return {_s(k): (None if v == b"open" else orjson.loads(v)) for k, v in sorted(raw.items())}

    def account_duplicate(
        self,
        job_id: str,
        number: int,
        batch_id: str,
        record: Mapping[str, Any],
        increments: Sequence[tuple[int, str, int]],
        daily_key: str,
    ) -> bool:
        """Add what a duplicate billed to the job and totals, once; True when added now."""
        args: list[Any] = [
            batch_id,
            orjson.dumps(record),
            keys.DAILY_SPEND_TTL_SECONDS,
            f"{job_id}:{number}:{batch_id}",
        ]
        for target, field, amount in increments:
            args += [target, field, amount]
        return bool(
            self._accounted(
                keys=[
                    keys.job_duplicates(job_id),
                    keys.job_spend(job_id),
                    keys.TOTAL_TOKENS,
                    keys.TOTAL_COST,
                    daily_key,
                    keys.DUPLICATE_BATCHES,
                ],
                args=args,
            )
        )


def _now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return float(seconds) + micros / 1e6
