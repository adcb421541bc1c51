"""A job's ``deadline`` and ``on_deadline``: what intake accepts and what every refusal says.

Times are taken relative to the clock at the test (never a fixed date), so the tests hold on any
day and under ``faketime``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import orjson
import pytest

from service.catalog import cached_catalog
from service.errors import FieldErrors, Problem
from service.jobs import deadline
from service.jobs.spec import parse_job_csv, parse_job_json

CAT = cached_catalog()


def rfc3339(ts: float, offset_hours: int = 0) -> str:
    tz = dt.timezone(dt.timedelta(hours=offset_hours))
    return dt.datetime.fromtimestamp(ts, tz).isoformat().replace("+00:00", "Z")


def body(**extra: Any) -> bytes:
    return orjson.dumps({"items": [{"id": "a", "prompt": "A red mug"}], **extra})


def problem_fields(exc: pytest.ExceptionInfo[Problem]) -> dict[str, str]:
    return {e.field: e.message for e in exc.value.errors}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-02T03:04:05Z", 1893553445.0),
        ("2030-01-02t03:04:05z", 1893553445.0),
        ("2030-01-02T04:04:05+01:00", 1893553445.0),
        ("2030-01-02 03:04:05.25Z", 1893553445.25),
        ("2030-01-02T03:04:05.123456789Z", 1893553445.123456),
    ],
)
def test_rfc3339_date_times_parse(text: str, expected: float) -> None:
    assert deadline.parse_deadline(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-02",  # a date alone
        "2030-01-02T03:04:05",  # no offset: which time zone?
        "2030-01-02T03:04Z",  # no seconds
        "20300102T030405Z",  # ISO basic format is not RFC 3339
        "2030-13-02T03:04:05Z",  # no 13th month
        "tomorrow",
    ],
)
def test_other_texts_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        deadline.parse_deadline(text)


def test_a_job_carries_its_deadline_and_policy() -> None:
    when = time.time() + 3600
    spec = parse_job_json(body(deadline=rfc3339(when, 2), on_deadline="sync"), CAT, max_items=10)
    assert spec.deadline == pytest.approx(when, abs=1e-3)
    assert spec.on_deadline == "sync"
    plain = parse_job_json(body(), CAT, max_items=10)
    assert (plain.deadline, plain.on_deadline) == (None, "wait")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"deadline": "next week"}, "deadline", "RFC 3339"),
        ({"deadline": 1893553445}, "deadline", "must be a string"),
        ({"deadline": "2001-01-01T00:00:00Z"}, "deadline", "already passed"),
        ({"on_deadline": "panic", "deadline": "2999-01-01T00:00:00Z"}, "on_deadline", "one of"),
        ({"on_deadline": "sync"}, "on_deadline", "needs a deadline"),
    ],
)
def test_bad_deadlines_are_refused_naming_the_field(
    extra: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(Problem) as exc:
        parse_job_json(body(**extra), CAT, max_items=10)
    assert exc.value.status == 422
    assert words in problem_fields(exc)[field]


def test_a_deadline_just_past_is_refused() -> None:
    errors = FieldErrors()
    now = time.time()
    got = deadline.fields({"deadline": rfc3339(now - 1)}, errors, now=now)
    assert got["deadline"] is None and len(errors) == 1


def test_the_csv_form_takes_them_as_query_parameters() -> None:
    when = time.time() + 7200
    params = {"deadline": rfc3339(when), "on_deadline": "cancel"}
    spec = parse_job_csv(b"id,prompt\na,A red mug\n", params, CAT, max_items=10)
    assert spec.deadline == pytest.approx(when, abs=1e-3)
    assert spec.on_deadline == "cancel"
