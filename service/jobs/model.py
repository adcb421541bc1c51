"""The job model: a job, its chunks and its items, typed, as the store reads them from Redis.

A :class:`Job` and a :class:`Chunk` are snapshots: read one with :class:`service.jobs.store.JobStore`,
act, and write changes back through the store's compare-and-set methods (never by mutating the
snapshot). Redis keeps them as hashes of strings (layout in :mod:`service.redis.keys`); the
conversion to and from those strings lives here and nowhere else.

Item states are one letter each (a 50,000-item job is one hash of small strings) packed with the
item's attempts, chunk and id: ``"q|1|3|sku-7"``. The Lua scripts in ``service/redis/scripts``
unpack the same format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# --- items ---------------------------------------------------------------------------------
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
NO_CHUNK = -1  # an item not yet planned into any chunk


def pack_item(status: str, attempts: int, chunk: int, item_id: str) -> str:
    return f"{status}|{attempts}|{chunk}|{item_id}"


@dataclass(frozen=True, slots=True)
class ItemState:
    """Where one item stands: its status letter, attempts so far, chunk, and caller's id."""

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

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, "unknown")


# --- jobs ----------------------------------------------------------------------------------
JOB_QUEUED, JOB_RUNNING, JOB_CANCELLING = "queued", "running", "cancelling"
JOB_LIVE = (JOB_QUEUED, JOB_RUNNING)
JOB_FINAL = ("succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted")


def _text(raw: Mapping[str, str], name: str) -> str | None:
    value = raw.get(name)
    return value if value else None


def _number(raw: Mapping[str, str], name: str) -> float | None:
    value = raw.get(name)
    return float(value) if value else None


def _int(raw: Mapping[str, str], name: str, default: int = 0) -> int:
    value = raw.get(name)
    return int(float(value)) if value else default


@dataclass(frozen=True)
class Job:
    """A job as recorded at intake, with its status and what happened to it since."""

    id: str
    tenant: str
    status: str
    model: str
    mode: str  # the lane chosen at intake: "batch" or "sync"
    items: int
    images: int
    created_at: float
    requested_mode: str = "batch"
    labels: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    max_cost_usd: float | None = None
    webhook_url: str | None = None
    idempotency_key: str | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    budget_exhausted: bool = False
    reason: str | None = None
    reuse: str = "auto"  # "auto" | "never" (service.jobs.reuse)
    retries: int = 0  # times the job was retried in place (service.jobs.retry)
    deadline: float | None = None  # unix time the caller needs the job finished by
    on_deadline: str = "wait"  # "wait" | "sync" | "cancel" (service.lanes.deadline)
    # Why the job's items run on the sync lane when it did not start there: "deadline" (it left
    # the batch lane to make its deadline) or "model_not_batch_capable" (service.lanes.reroute).
    lane_reason: str | None = None
    switched_at: float | None = None  # when it left the batch lane

    @property
    def campaign(self) -> str:
        return self.labels.get("campaign", "")

    @property
    def is_live(self) -> bool:
        """Still taking work: queued or running (not cancelling, not finished)."""
        return self.status in JOB_LIVE

    @property
    def is_final(self) -> bool:
        return self.status in JOB_FINAL

    @property
    def max_cost_nanousd(self) -> int | None:
        return None if self.max_cost_usd is None else round(self.max_cost_usd * 1_000_000_000)

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> Job:
        return cls(
            id=raw["id"],
            tenant=raw["tenant"],
            status=raw["status"],
            model=raw["model"],
            mode=raw.get("mode") or "batch",
            requested_mode=raw.get("requested_mode") or raw.get("mode") or "batch",
            items=_int(raw, "items"),
            images=_int(raw, "images"),
            created_at=_number(raw, "created_at") or 0.0,
            labels=orjson.loads(raw.get("labels") or "{}"),
            estimate=orjson.loads(raw["estimate"]) if raw.get("estimate") else None,
            max_cost_usd=_number(raw, "max_cost_usd"),
            webhook_url=_text(raw, "webhook_url"),
            idempotency_key=_text(raw, "idempotency_key"),
            updated_at=_number(raw, "updated_at"),
            finished_at=_number(raw, "finished_at"),
            budget_exhausted=bool(raw.get("budget_exhausted")),
            reason=_text(raw, "reason"),
            reuse=raw.get("reuse") or "auto",
            retries=_int(raw, "retries"),
            deadline=_number(raw, "deadline"),
            on_deadline=raw.get("on_deadline") or "wait",
            lane_reason=_text(raw, "lane_reason"),
            switched_at=_number(raw, "switched_at"),
        )

    def to_hash(self) -> dict[str, str]:
        """The fields as Redis keeps them (absent values are left out)."""
        fields: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "status": self.status,
            "mode": self.mode,
            "requested_mode": self.requested_mode,
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "items": self.items,
            "images": self.images,
            "labels": orjson.dumps(self.labels).decode(),
            "campaign": self.campaign,
            "estimate": orjson.dumps(self.estimate).decode() if self.estimate else None,
            "max_cost_usd": self.max_cost_usd,
            "webhook_url": self.webhook_url,
            "idempotency_key": self.idempotency_key,
            "budget_exhausted": 1 if self.budget_exhausted else None,
            "reason": self.reason,
            "reuse": self.reuse,
            "retries": self.retries or None,
            "deadline": self.deadline,
            "on_deadline": self.on_deadline if self.on_deadline != "wait" else None,
            "lane_reason": self.lane_reason,
            "switched_at": self.switched_at,
        }
        return {k: str(v) for k, v in fields.items() if v is not None}


# --- chunks --------------------------------------------------------------------------------
# A chunk is one attempt at one upstream batch (or, for a sync job, chunk 0: all its items).
CHUNK_ASSEMBLING = "assembling"  # plan is still adding items
CHUNK_PLANNED = "planned"  # complete, waiting to be submitted
CHUNK_WAITING = "waiting"  # waiting for budget
CHUNK_SUBMITTED = "submitted"  # upstream batch exists
CHUNK_COLLECTING = "collecting"  # upstream batch ended; results being read
CHUNK_DONE = "done"  # every line accounted for
CHUNK_CANCELLED = "cancelled"  # never submitted: the job was cancelled
CHUNK_SYNC = "sync"  # a sync job's items, sent to the images endpoints
CHUNK_NOT_SUBMITTED = (CHUNK_ASSEMBLING, CHUNK_PLANNED, CHUNK_WAITING)
UPSTREAM_CHUNK_STATES = (CHUNK_SUBMITTED, CHUNK_COLLECTING)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a job: its items go upstream together as one batch input file."""

    job_id: str
    number: int
    status: str
    endpoint: str = ""
    model: str = ""
    size: str = ""  # its items' size ("mixed" when they differ; "" for chunks planned before)
    lines: int = 0
    open: int = 0  # lines not yet accounted for
    bytes: int = 0
    attempt: int = 1
    est_input_tokens: int = 0
    est_nanousd: int = 0
    input_file_id: str | None = None
    batch_id: str | None = None
    upstream_status: str | None = None
    upstream_completed: int = 0
    upstream_failed: int = 0
    create_started: float | None = None
    create_counted: bool = False
    create_uncertain: bool = False  # a create's outcome was unknown: look for duplicates at the end
    created_at: float | None = None
    submitted_at: float | None = None
    ended_at: float | None = None
    collected_at: float | None = None
    waiting_since: float | None = None
    # When it could first have gone upstream: planned, or (after waiting for the token budget)
    # when the queue last gave tokens back; where a forecast's batch duration starts.
    eligible_at: float | None = None
    last_error: str | None = None

    @property
    def ref(self) -> str:
        """``job_id:number``: how the sweep's sets and the enqueue markers name the chunk."""
        return f"{self.job_id}:{self.number}"

    @property
    def attempt_ref(self) -> str:
        """``job_id:number:attempt``: one upstream batch attempt (budget holds, batch metadata)."""
        return f"{self.job_id}:{self.number}:{self.attempt}"

    @property
    def upstream(self) -> bool:
        return self.status in UPSTREAM_CHUNK_STATES

    @classmethod
    def from_hash(cls, job_id: str, number: int, raw: Mapping[str, str]) -> Chunk:
        return cls(
            job_id=job_id,
            number=number,
            status=raw.get("status", ""),
            endpoint=raw.get("endpoint", ""),
            model=raw.get("model", ""),
            size=raw.get("size", ""),
            lines=_int(raw, "lines"),
            open=_int(raw, "open"),
            bytes=_int(raw, "bytes"),
            attempt=_int(raw, "attempt", 1),
            est_input_tokens=_int(raw, "est_input_tokens"),
            est_nanousd=_int(raw, "est_nanousd"),
            input_file_id=_text(raw, "input_file_id"),
            batch_id=_text(raw, "batch_id"),
            upstream_status=_text(raw, "upstream_status"),
            upstream_completed=_int(raw, "upstream_completed"),
            upstream_failed=_int(raw, "upstream_failed"),
            create_started=_number(raw, "create_started"),
            create_counted=bool(raw.get("create_counted")),
            create_uncertain=bool(raw.get("create_uncertain")),
            created_at=_number(raw, "created_at"),
            submitted_at=_number(raw, "submitted_at"),
            ended_at=_number(raw, "ended_at"),
            collected_at=_number(raw, "collected_at"),
            waiting_since=_number(raw, "waiting_since"),
            eligible_at=_number(raw, "eligible_at"),
            last_error=_text(raw, "last_error"),
        )


def split_ref(member: bytes | str) -> tuple[str, int]:
    """``"job_id:number"`` (a sweep set member) -> (job_id, number)."""
    text = member.decode() if isinstance(member, bytes) else member
    job_id, _, n = text.rpartition(":")
    return job_id, int(n)
