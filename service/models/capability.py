"""What each model was seen to do upstream, learned cluster-wide in Redis.

**Batch support.** OpenAI does not publish reliably which models take the Batch API (facts §7.2),
so the catalog's ``batch`` is only what is configured. When upstream fails a batch because its
model does not support the Batch API, :func:`learn_not_batch_capable` records that for every
worker, expiring after ``IMAGEBATCH_BATCH_UNSUPPORTED_TTL`` so batches are tried again later. Until
then ``auto`` jobs for the model run on the sync lane and ``batch`` jobs' items fail with
:data:`NOT_BATCH_CAPABLE` (the lanes act on it: :mod:`service.lanes.reroute`).

**Output tokens.** For models whose token counts OpenAI does not publish (the catalog's
``token_table = "unpublished"``), every item whose ``usage`` is counted adds its output image
tokens per image to a decaying average per (size, quality) (:func:`observe_tokens`, a Lua script
so concurrent workers never lose an update); estimates use it once it exists
(:func:`learned_tokens`).

Failure semantics: a Redis error propagates to the caller (a task retries); nothing learned is
needed for correctness, only for choosing a lane sooner and estimating closer.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from service.catalog import Catalog
from service.redis import keys, lua

NOT_BATCH_CAPABLE = "model_not_batch_capable"
# Upstream's error code for a model an endpoint does not take. The same code also means "this
# model does not offer this endpoint", so the message must name the Batch API too.
_UNSUPPORTED_CODE = "unsupported_model"
# A new observation weighs at least this much in the learned average (about the last 20 items
# dominate), so the estimate follows upstream when its counts change.
LEARN_WEIGHT = 0.1
# Learned token averages of a model nobody has used for this long are forgotten.
LEARNED_TOKENS_TTL_SECONDS = 90 * 86400


# --- batch support ---------------------------------------------------------------------------
def is_batch_refusal(code: str | None, message: str | None) -> bool:
    """Whether a failed batch's error says its model does not support the Batch API."""
    return code == _UNSUPPORTED_CODE and "batch" in (message or "").lower()


def learn_not_batch_capable(
    r: redis.Redis, model: str, *, batch_id: str, message: str, ttl: dt.timedelta
) -> bool:
    """Record that upstream refused batches of ``model``; True when this is news (not already
    recorded), so the caller logs it once."""
    record = {"since": time.time(), "batch_id": batch_id, "message": message}
    seconds = max(1, int(ttl.total_seconds()))
    return bool(r.set(keys.batch_unsupported(model), orjson.dumps(record), ex=seconds, nx=True))


def batch_refusals(r: redis.Redis, model_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The learned refusals of ``model_ids`` (one round trip), each with its ``until`` time."""
    ids = list(model_ids)
    if not ids:
        return {}
    pipe = r.pipeline(transaction=False)
    for mid in ids:
        pipe.get(keys.batch_unsupported(mid))
        pipe.ttl(keys.batch_unsupported(mid))
    raw = pipe.execute()
    now = time.time()
    out: dict[str, dict[str, Any]] = {}
    for mid, value, ttl in zip(ids, raw[::2], raw[1::2], strict=True):
        if value is None:
            continue
        try:
            record = dict(orjson.loads(value))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            record = {}
        record["until"] = now + ttl if isinstance(ttl, int) and ttl > 0 else None
        out[mid] = record
    return out


def batch_capable(r: redis.Redis, catalog: Catalog, model_id: str) -> bool:
    """The catalog says the model takes batches and upstream has not refused one lately."""
    model = catalog.get(model_id)
    return model is not None and model.batch and not r.exists(keys.batch_unsupported(model_id))


def not_batch_capable_error(model_id: str) -> dict[str, str]:
    """What an item of a ``batch`` job records when its model cannot be batched."""
    return {
        "code": NOT_BATCH_CAPABLE,
        "message": (
            f"model '{model_id}' does not support the Batch API (upstream refused a batch of it); "
            f'submit these items again with "mode": "auto" or "sync" (full price)'
        ),
    }


# --- output tokens ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Learned:
    """Output image tokens per image observed for one (size, quality), and how many items."""

    tokens: int
    samples: int


def observe_tokens(
    r: redis.Redis, model: str, size: str, quality: str, image_tokens: int, images: int
) -> None:
    """Fold one item's observed output image tokens (over its ``images``) into the average."""
    if images <= 0 or image_tokens <= 0 or not size or not quality:
        return
    lua.script(r, "learned_tokens_observe")(
        keys=[keys.learned_tokens(model)],
        args=[
            f"{size}|{quality}",
            image_tokens / images,
            LEARN_WEIGHT,
            LEARNED_TOKENS_TTL_SECONDS,
        ],
    )


def learned_tokens(r: redis.Redis, model: str) -> dict[tuple[str, str], Learned]:
    """(size, quality) -> what was learned for ``model``; empty when nothing was."""
    out: dict[tuple[str, str], Learned] = {}
    raw: dict[bytes, bytes] = r.hgetall(keys.learned_tokens(model))  # type: ignore[assignment]
    for field, value in raw.items():
        size, _, quality = field.decode().partition("|")
        avg, _, samples = value.decode().partition("|")
        try:
            out[(size, quality)] = Learned(round(float(avg)), int(samples))
        except ValueError:
            continue
    return out
