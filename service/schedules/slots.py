"""Cron slots: when a schedule's runs fall, in its own time zone.

Parsing and iterating cron expressions is :mod:`cronsim` (Healthchecks' parser): five fields,
names (``MON``, ``JAN``), ranges, steps, ``L`` and ``#``, and Debian cron's handling of daylight
saving time (a 02:30 job on a spring-forward day runs once, at 03:00; on a fall-back day once).
Slots are timezone-aware datetimes; the rest of the package stores them as unix seconds.

Failure semantics: :func:`cron_problem` / :func:`timezone_problem` say what is wrong with a
caller's expression or zone (None when fine); the other functions assume both were checked.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

FIELDS = 5
FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")


def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def timezone_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name or len(name) > 64:
        return "timezone must be an IANA time zone name such as 'Europe/Riga' or 'UTC'"
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}; use an IANA name such as 'Europe/Riga' or 'UTC'"
    return None


def cron_problem(expr: object) -> str | None:
    """Why ``expr`` is not a five-field cron expression we can run, or None."""
    if not isinstance(expr, str) or len(expr) > 256:
        return "cron must be a string of five fields: minute hour day-of-month month day-of-week"
    fields = expr.split()
    if len(fields) != FIELDS:
        return (
            f"cron must have five fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}: {expr!r}"
        )
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    try:
        next(CronSim(expr, start))
    except CronSimError as exc:
        return f"cron {expr!r}: {str(exc).lower() or 'invalid'}"
    except StopIteration:
        return f"cron {expr!r} never matches a date"
    return None


def next_after(expr: str, tz: str, after: float) -> float | None:
    """The first slot strictly after ``after`` (unix seconds); None if there is none within
    cronsim's horizon of 50 years."""
    start = dt.datetime.fromtimestamp(after, zone(tz))
    try:
        return next(CronSim(expr, start)).timestamp()
    except StopIteration:
        return None


def latest_at_or_before(expr: str, tz: str, at: float) -> float | None:
    """The last slot at or before ``at`` (unix seconds); None if none within 50 years."""
    # cronsim steps back one second before it matches, so start a second later.
    start = dt.datetime.fromtimestamp(int(at) + 1, zone(tz))
    try:
        return next(CronSim(expr, start, reverse=True)).timestamp()
    except StopIteration:
        return None


def describe(expr: str) -> str:
    """The expression in words ("At 06:00 on Monday through Friday")."""
    try:
        return CronSim(expr, dt.datetime(2030, 1, 1, tzinfo=dt.UTC)).explain()
    except (CronSimError, ValueError, KeyError, IndexError):
        return expr
