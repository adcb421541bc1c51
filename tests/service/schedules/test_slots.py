"""Cron slots with fixed dates (never today's): steps, time zones, daylight saving time."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from service.schedules import slots

RIGA = ZoneInfo("Europe/Riga")
NEW_YORK = ZoneInfo("America/New_York")


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, tz=dt.UTC) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def local(ts_: float, tz: ZoneInfo) -> tuple[int, int, int, int, int]:
    d = dt.datetime.fromtimestamp(ts_, tz)
    return (d.year, d.month, d.day, d.hour, d.minute)


def test_next_slot_is_strictly_after_and_in_the_schedules_zone() -> None:
    # Weekdays at 06:00 in Riga, asked on a Friday at noon: the next is Monday 06:00 local.
    after = ts(2031, 3, 21, 12, 0, RIGA)
    nxt = slots.next_after("0 6 * * 1-5", "Europe/Riga", after)
    assert nxt is not None and local(nxt, RIGA) == (2031, 3, 24, 6, 0)
    # Exactly on a slot: the next one, not the same.
    on = ts(2031, 3, 24, 6, 0, RIGA)
    assert local(slots.next_after("0 6 * * 1-5", "Europe/Riga", on), RIGA) == (2031, 3, 25, 6, 0)
    # Every minute, from mid-minute.
    assert slots.next_after("* * * * *", "UTC", ts(2031, 1, 1, 0, 0) + 30) == ts(2031, 1, 1, 0, 1)


def test_latest_slot_at_or_before_includes_an_exact_slot() -> None:
    at = ts(2031, 1, 1, 12, 0)
    assert slots.latest_at_or_before("0 * * * *", "UTC", at) == at
    assert slots.latest_at_or_before("0 * * * *", "UTC", at + 3599) == at
    assert slots.latest_at_or_before("*/15 * * * *", "UTC", at - 1) == at - 15 * 60


def test_daylight_saving_time_runs_a_daily_slot_once_each_day() -> None:
    # New York springs forward on 2031-03-09 (02:00 -> 03:00): a 02:30 job runs at 03:00 that
    # day, once, as Debian cron does; and falls back on 2031-11-02, when 01:30 happens twice.
    runs, at = [], ts(2031, 3, 7, 12, 0, NEW_YORK)
    for _ in range(4):
        at = slots.next_after("30 2 * * *", "America/New_York", at)
        runs.append(local(at, NEW_YORK))
    assert runs == [
        (2031, 3, 8, 2, 30),
        (2031, 3, 9, 3, 0),
        (2031, 3, 10, 2, 30),
        (2031, 3, 11, 2, 30),
    ]
    first = slots.next_after("30 1 * * *", "America/New_York", ts(2031, 11, 1, 12, 0, NEW_YORK))
    second = slots.next_after("30 1 * * *", "America/New_York", first)
    assert local(first, NEW_YORK) == (2031, 11, 2, 1, 30)
    assert local(second, NEW_YORK) == (2031, 11, 3, 1, 30)  # not the repeated hour


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("* * * *", "five fields"),
        ("0 0 * * * *", "five fields"),  # cronsim takes seconds; we do not
        ("61 * * * *", "bad minute"),
        ("* 24 * * *", "bad hour"),
        ("0 0 31 2 *", "day-of-month"),
        (5, "five fields"),
    ],
)
def test_bad_cron_expressions_are_explained(expr: object, says: str) -> None:
    problem = slots.cron_problem(expr)
    assert problem is not None and says in problem.lower()


def test_good_expressions_and_zones() -> None:
    assert slots.cron_problem("0 6 * * MON-FRI") is None
    assert slots.cron_problem("*/5 9-17 1,15 JAN-JUN *") is None
    assert slots.timezone_problem("Europe/Riga") is None
    assert "unknown time zone" in (slots.timezone_problem("Mars/Olympus") or "")
    assert slots.timezone_problem("../../etc/passwd") is not None
    assert slots.describe("0 6 * * 1-5") == "At 06:00 on Monday through Friday"
