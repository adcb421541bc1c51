"""Model lifecycle: the catalog merged with what upstream says about each model right now.

OpenAI announces shutdowns in ``GET /v1/models`` (``shutdown_date``) before our catalog file
learns of them, and a model it no longer offers simply drops out of that list. :func:`refresh`
reads the list (at API start and every ``IMAGEBATCH_MODELS_REFRESH_SECONDS`` from beat) and keeps
it in Redis; :class:`ModelView` merges it with the catalog and the batch support learned per model
(:mod:`service.models.capability`) into what intake checks and ``GET /v1/models`` shows.

The merge: a model's shutdown date is the earlier of the catalog's and upstream's (we never send
a request to a model either source says is gone); on or before "today" it is refused, naming the
date and the catalog's replacements. A catalog model missing from upstream's list is refused as
not offered. "Today" is a UTC date from an injectable clock, so tests never depend on the date.

Failure semantics: when upstream's list cannot be read, the last list read stays in force
(``ib:models:upstream`` never expires); with no list ever read the catalog stands alone and a
warning is logged. A list naming none of the catalog's models (a proxy with other model names)
says nothing about ours and is ignored for "not offered".
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from service.catalog import Catalog, Model
from service.models.capability import batch_refusals
from service.redis import keys
from service.upstream import Upstream, UpstreamError

log = logging.getLogger("imagebatch.models")

Clock = Callable[[], dt.date]

ACTIVE, SHUTTING_DOWN, SHUT_DOWN = "active", "shutting_down", "shut_down"
# A warning accompanies every job for a model that shuts down within this many days.
WARN_DAYS = 90


def utc_today() -> dt.date:
    """Today in UTC: the day upstream's shutdown dates are written in."""
    return dt.datetime.now(dt.UTC).date()


@dataclass(frozen=True)
class UpstreamList:
    """Upstream's model list as last read: id -> announced shutdown date (or None)."""

    fetched_at: float
    models: dict[str, dt.date | None]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "fetched_at": self.fetched_at,
                "models": {m: d.isoformat() if d else None for m, d in self.models.items()},
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> UpstreamList:
        data = orjson.loads(raw)
        return cls(
            float(data["fetched_at"]),
            {m: _date(d) for m, d in dict(data["models"]).items()},
        )


def _date(value: Any) -> dt.date | None:
    """An announced shutdown date; anything unreadable is treated as none announced."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def refresh(
    r: redis.Redis, upstream: Upstream, *, timeout: float = 30.0, max_retries: int | None = None
) -> UpstreamList | None:
    """Read upstream's model list and keep it in Redis; None (the last list kept) on failure."""
    try:
        listed = upstream.models(timeout=timeout, max_retries=max_retries)
    except UpstreamError as exc:
        last = stored_list(r)
        if last is None:
            log.warning(
                "could not read upstream's model list (%s); checking models against the "
                "catalog alone until it can be read",
                exc,
            )
        else:
            age = (time.time() - last.fetched_at) / 3600
            log.warning(
                "could not read upstream's model list (%s); using the list read %.1f h ago",
                exc,
                age,
            )
        return None
    fresh = UpstreamList(time.time(), {m: _date(d) for m, d in listed.items()})
    r.set(keys.UPSTREAM_MODELS, fresh.to_json())
    return fresh


def stored_list(r: redis.Redis) -> UpstreamList | None:
    raw = r.get(keys.UPSTREAM_MODELS)
    if raw is None:
        return None
    try:
        return UpstreamList.from_json(raw)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("the stored upstream model list is unreadable; ignoring it")
        return None


@dataclass(frozen=True)
class ModelState:
    """One catalog model as intake and ``GET /v1/models`` see it today."""

    model: Model
    state: str  # ACTIVE, SHUTTING_DOWN or SHUT_DOWN
    shutdown_date: dt.date | None
    shutdown_source: str | None  # "catalog", "upstream" (the earlier date's), or None
    offered: bool | None  # listed by upstream; None when no usable list is known
    batch_configured: bool
    batch_refusal: Mapping[str, Any] | None  # learned: upstream refused a batch of it

    @property
    def batch_capable(self) -> bool:
        return self.batch_configured and self.batch_refusal is None

    def refusal(self) -> str | None:
        """Why a job for this model is refused, or None."""
        if self.state == SHUT_DOWN:
            return _shutdown_message(self.model, self.shutdown_date, self.shutdown_source)
        if self.offered is False:
            names = _names(self.model.replacements)
            hint = f"; use {names} instead" if self.model.replacements else ""
            return (
                f"model '{self.model.id}' is not offered by upstream: its model list "
                f"(GET /v1/models) does not include it{hint}"
            )
        return None

    def warning(self) -> str | None:
        if self.state != SHUTTING_DOWN or self.shutdown_date is None:
            return None
        names = _names(self.model.replacements) if self.model.replacements else "another model"
        return (
            f"model '{self.model.id}' shuts down on {self.shutdown_date.isoformat()}; "
            f"move to {names} before then"
        )


def _names(ids: tuple[str, ...]) -> str:
    return " or ".join(f"'{r}'" for r in ids) or "another model"


def _shutdown_message(model: Model, when: dt.date | None, source: str | None) -> str:
    said = " (announced by upstream)" if source == "upstream" else ""
    day = when.isoformat() if when else "an earlier date"
    return (
        f"model '{model.id}' was shut down on {day}{said}; use {_names(model.replacements)} instead"
    )


def merge(
    model: Model,
    upstream: UpstreamList | None,
    refusal: Mapping[str, Any] | None,
    today: dt.date,
) -> ModelState:
    """One model's state from the catalog, upstream's list (None: unknown) and what was learned."""
    dates: list[tuple[dt.date, str]] = []
    if model.shutdown_date is not None:
        dates.append((model.shutdown_date, "catalog"))
    offered: bool | None = None
    if upstream is not None:
        offered = model.id in upstream.models
        announced = upstream.models.get(model.id)
        if announced is not None:
            dates.append((announced, "upstream"))
    when, source = min(dates) if dates else (None, None)
    if when is not None and when <= today:
        state = SHUT_DOWN
    elif when is not None:
        state = SHUTTING_DOWN
    else:
        state = ACTIVE
    return ModelState(model, state, when, source, offered, model.batch, refusal)


def catalog_state(model: Model, today: dt.date | None = None) -> ModelState:
    """A model as the catalog alone has it (no upstream list, nothing learned)."""
    return merge(model, None, None, today or utc_today())


class ModelView:
    """The catalog merged with upstream's list and learned batch support, as of ``today``."""

    def __init__(
        self,
        catalog: Catalog,
        upstream: UpstreamList | None,
        batch_refusals: Mapping[str, Mapping[str, Any]],
        today: dt.date,
    ) -> None:
        self.catalog = catalog
        self.upstream = upstream
        self.today = today
        # A list naming none of our models is about other models (a proxy, another provider).
        self.upstream_usable = upstream is not None and any(
            m in upstream.models for m in catalog.models
        )
        listed = upstream if self.upstream_usable else None
        self._states = {
            mid: merge(model, listed, batch_refusals.get(mid), today)
            for mid, model in catalog.models.items()
        }

    def get(self, model_id: str) -> ModelState | None:
        return self._states.get(model_id)

    def __iter__(self) -> Iterator[ModelState]:
        return iter(self._states.values())

    def live_ids(self) -> list[str]:
        """Models a job may use today (for "did you mean" hints and /v1/info)."""
        return [s.model.id for s in self if s.refusal() is None]

    def shutdown_timestamps(self) -> list[tuple[str, float]]:
        """(model, unix time of 00:00 UTC on its shutdown day) for every dated model."""
        return [
            (s.model.id, dt.datetime.combine(s.shutdown_date, dt.time(), dt.UTC).timestamp())
            for s in self
            if s.shutdown_date is not None
        ]

    @property
    def source(self) -> str:
        """Where lifecycle facts come from: ``upstream`` (a list is known) or ``catalog``."""
        return "upstream" if self.upstream_usable else "catalog"


def load_view(r: redis.Redis, catalog: Catalog, today: dt.date) -> ModelView:
    """The view from what Redis holds now: two round trips, small values."""
    return ModelView(catalog, stored_list(r), batch_refusals(r, catalog.models), today)
