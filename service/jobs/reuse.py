"""The reuse index: per tenant, which stored image answers which fingerprint.

When a job finishes, each item that has images is recorded under its fingerprint
(:mod:`service.jobs.fingerprint`): the job and item it belongs to, its storage keys, and what it
cost to make. Planning looks fingerprints up (:meth:`ReuseIndex.lookup`) and completes matching
items by copying those objects instead of calling upstream (:mod:`service.lanes.reuse`); intake
looks up the ones it can compute without reading references to price a job (:func:`estimate`).

The index lives in Redis (``keys.reuse_index``), so it survives a restart wherever Redis keeps
its data (the embedded Redis writes an append-only file). It is bounded two ways: at most
``IMAGEBATCH_REUSE_MAX_ENTRIES`` entries per tenant (the least recently recorded go first), and
an entry not recorded again within ``IMAGEBATCH_REUSE_TTL`` is dropped (a reused image is
recorded again, under its new copy, so images in use stay). Trimming happens in the same Lua
call that records (``reuse_record.lua``), a bounded amount per call.

Tenants never share: the key names the tenant, and every call takes one.

Failure semantics: an entry is a hint, not a promise. The object it names may have been deleted
since; the caller copies it and, on ObjectNotFound, :meth:`ReuseIndex.forget` s the entry and
generates the item. Redis errors propagate (the caller's task retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from service import pricing
from service.catalog import Catalog
from service.jobs import fingerprint as fp
from service.jobs.schema import ItemSpec
from service.redis import keys, lua

_PAGE = 1000  # fingerprints per Redis round trip


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored image set a fingerprint can reuse: where it is, and what making it cost."""

    job_id: str
    item_id: str
    keys: list[str]
    cost_nanousd: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"j": self.job_id, "i": self.item_id, "k": self.keys, "c": self.cost_nanousd}
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Entry:
        d = orjson.loads(raw)
        return cls(str(d["j"]), str(d["i"]), [str(k) for k in d["k"]], int(d.get("c", 0)))


class ReuseIndex:
    """One tenant's index. Cheap to make; make one per job step."""

    def __init__(self, client: redis.Redis, tenant: str, max_entries: int, ttl_seconds: float):
        self.r = client
        self.entries_key, self.used_key = keys.reuse_index(tenant)
        self.max_entries = max(1, max_entries)
        self.ttl_ms = max(1000, int(ttl_seconds * 1000))
        self._record = lua.script(client, "reuse_record")

    @classmethod
    def of(cls, ctx: Any, tenant: str) -> ReuseIndex:
        """The index of ``tenant`` with the process's settings (``ctx`` is a Context)."""
        s = ctx.settings
        return cls(ctx.redis, tenant, s.reuse_max_entries, s.reuse_ttl.total_seconds())

    def lookup(self, fingerprints: Sequence[str | None]) -> list[Entry | None]:
        """The entry of each fingerprint (None where there is none, or no fingerprint)."""
        out: list[Entry | None] = [None] * len(fingerprints)
        wanted = [(i, f) for i, f in enumerate(fingerprints) if f]
        for start in range(0, len(wanted), _PAGE):
            page = wanted[start : start + _PAGE]
            raw = self.r.hmget(self.entries_key, [f for _, f in page])
            for (i, _), value in zip(page, raw, strict=True):
                if value:
                    out[i] = Entry.from_json(value)
        return out

    def record(self, entries: Iterable[tuple[str, Entry]]) -> int:
        """Record (fingerprint, entry) pairs, newest wins; returns how many old entries went."""
        dropped = 0
        page: list[Any] = []
        for fingerprint, entry in entries:
            page += [fingerprint, entry.to_json()]
            if len(page) >= 2 * _PAGE:
                dropped += self._record_page(page)
                page = []
        if page:
            dropped += self._record_page(page)
        return dropped

    def _record_page(self, page: list[Any]) -> int:
        now = int(time.time() * 1000)
        args = [now, now - self.ttl_ms, self.max_entries, self.ttl_ms, *page]
        return int(self._record(keys=[self.entries_key, self.used_key], args=args))

    def forget(self, fingerprint: str) -> None:
        """The entry's object is gone: never offer it again."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(self.entries_key, fingerprint)
        pipe.zrem(self.used_key, fingerprint)
        pipe.execute()

    def size(self) -> int:
        return int(self.r.hlen(self.entries_key))


def manifest_recorder(index: ReuseIndex, job_id: str) -> Callable[[list[dict[str, Any]]], None]:
    """What finalize passes to ``write_manifest``: every succeeded item with a fingerprint and
    images is recorded under its fingerprint, pointing at this job's copy (the newest, and so
    the likeliest to still exist). A reused item passes on the cost of the original."""

    def observe(lines: list[dict[str, Any]]) -> None:
        index.record(
            (
                line["fingerprint"],
                Entry(job_id, line["id"], line["keys"], _made_for(line)),
            )
            for line in lines
            if line["status"] == "succeeded" and line.get("fingerprint") and line.get("keys")
        )

    return observe


def _made_for(line: dict[str, Any]) -> int:
    usd = line.get("saved_usd") if line.get("reused_from") else line.get("cost_usd")
    return round(float(usd or 0) * 1e9)


@dataclass
class ReuseEstimate:
    """What intake expects reuse to save: items (and images) it found, and edits it could not
    check without reading their references (priced in full)."""

    items: int = 0
    images: int = 0
    unchecked: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"items": self.items, "images": self.images, "unchecked_edits": self.unchecked}


def estimate(
    index: ReuseIndex | None, catalog: Catalog, items: Sequence[ItemSpec]
) -> tuple[Iterable[ItemSpec], ReuseEstimate]:
    """The items intake should price (those not found in the index), and what was found.

    Generations (and edits whose references are ``data:`` or upstream file ids) are looked up;
    edits with ``s3://`` / ``file://`` references would have to be read, which intake does not
    do: they are priced in full and counted as ``unchecked``. Without an index (``reuse:
    never``, or a tenant with nothing recorded) every item is priced. The items are read a page
    at a time and the rest is a view of ``items`` (no copy of a large job is made).
    """
    found = ReuseEstimate()
    if index is None or not items:
        return items, found
    snapshots: dict[str, str] = {}
    reused: set[int] = set()  # positions in items
    page: list[tuple[int, int, str | None]] = []  # position, images, fingerprint

    def look_up() -> None:
        entries = index.lookup([value for _, _, value in page])
        for (position, images, _), entry in zip(page, entries, strict=True):
            if entry is not None:
                reused.add(position)
                found.items += 1
                found.images += images
        page.clear()

    for position, item in enumerate(items):
        snap = snapshots.get(item.model)
        if snap is None:
            snap = snapshots[item.model] = fp.snapshot(catalog, item.model)
        try:
            value = fp.without_reading(item.endpoint, item.body, snap)
        except ValueError:
            value = None
        if value is None and item.is_edit:
            found.unchecked += 1
        page.append((position, item.n, value))
        if len(page) >= _PAGE:
            look_up()
    look_up()
    return _Rest(items, reused), found


class _Rest:
    """``items`` without those at the ``skipped`` positions (iterable again and again)."""

    def __init__(self, items: Sequence[ItemSpec], skipped: set[int]) -> None:
        self.items, self.skipped = items, skipped

    def __iter__(self) -> Iterator[ItemSpec]:
        skipped = self.skipped
        return (item for i, item in enumerate(self.items) if i not in skipped)


def saved_estimate(
    rest: Iterable[ItemSpec],
    found: ReuseEstimate,
    catalog: Catalog,
    learned: Mapping[str, Mapping[tuple[str, str], Any]] | None = None,
) -> pricing.Estimate:
    """The estimate of the items left to make, carrying what reuse found (``learned`` as for
    :func:`service.pricing.estimate_job`)."""
    out = pricing.estimate_job(rest, catalog, learned)
    out.reuse = found.to_dict()
    return out
