"""A job's deadline: when the caller needs it finished, and what to do when the batch lane will not
make it. This module parses and validates the two job fields; :mod:`service.lanes.deadline` acts
on them from the sweep, and :mod:`service.jobs.eta` forecasts the finish they are checked against.

``deadline``     RFC 3339 date-time with an offset (``2026-12-03T09:00:00Z``,
                 ``2026-12-03T10:00:00+01:00``), in the future when the job is submitted.
``on_deadline``  ``wait`` (the default: the forecast is shown, nothing changes), ``sync`` (when the
                 forecast's p90 or the clock says the batch lane will miss, the job's unfinished
                 items go to the sync lane at full price, within ``max_cost_usd`` and the
                 tenant's caps) or ``cancel`` (the job stops at the deadline, finished images kept).

Failure semantics: bad input is a field error naming ``deadline`` or ``on_deadline`` (the caller
gets one problem+json listing every error of the job); nothing here raises.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

from service.errors import FieldErrors
from service.jobs.messages import json_type, show

ON_DEADLINE: tuple[str, ...] = ("wait", "sync", "cancel")
# A job's ``lane_reason`` once it left the batch lane to make its deadline.
DEADLINE = "deadline"
# RFC 3339's date-time (section 5.6): a full date, a time with seconds, an offset or Z.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"
)


def parse_deadline(text: str) -> float:
    """Unix time of an RFC 3339 date-time; ``ValueError`` saying why not."""
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError("must be an RFC 3339 date-time with its offset, like 2026-12-03T09:00:00Z")
    date, clock, frac, offset = match.groups()
    # fromisoformat reads at most microseconds: finer fractions are cut, never rounded up.
    frac = (frac or "")[:7]
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        when = dt.datetime.fromisoformat(f"{date}T{clock}{frac}{offset}")
    except ValueError as exc:
        raise ValueError(f"is not a valid date-time: {exc}") from None
    return when.timestamp()


def fields(doc: dict[str, Any], errors: FieldErrors, now: float | None = None) -> dict[str, Any]:
    """``deadline`` (unix time or None) and ``on_deadline`` of a job body, checked; problems
    are added to ``errors`` naming the field."""
    raw, policy = doc.get("deadline"), doc.get("on_deadline")
    deadline: float | None = None
    if raw is not None and not isinstance(raw, str):
        errors.add("deadline", f"deadline must be a string (RFC 3339), not {json_type(raw)}")
    elif raw is not None:
        try:
            deadline = parse_deadline(raw)
        except ValueError as exc:
            errors.add("deadline", f"deadline {show(raw)} {exc}")
        else:
            now = time.time() if now is None else now
            if deadline <= now:
                errors.add(
                    "deadline",
                    f"deadline {show(raw)} has already passed: give a time to come",
                )
                deadline = None
    on_deadline = "wait"
    if policy is not None:
        if not isinstance(policy, str) or policy not in ON_DEADLINE:
            errors.add(
                "on_deadline",
                f"on_deadline must be one of {', '.join(ON_DEADLINE)}, not {show(policy)}",
            )
        elif policy != "wait" and raw is None:
            errors.add("on_deadline", f"on_deadline {policy!r} needs a deadline")
        else:
            on_deadline = policy
    return {"deadline": deadline, "on_deadline": on_deadline}
