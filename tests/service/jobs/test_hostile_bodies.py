"""Bodies built to cost the API: each is refused (or read) in little time and memory, with a
problem naming the field. Calls the parsers directly (the API adds only the transport)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.catalog import cached_catalog
from service.errors import Problem
from service.jobs.spec import parse_job_csv, parse_job_json

CATALOG = cached_catalog(None)


def refused(call: Any, *args: Any, **kw: Any) -> tuple[Problem, float]:
    """The refusal and the CPU seconds it cost (CPU, not wall time: the bound is about the work
    a hostile body makes us do, and must hold on a machine busy with other processes)."""
    started = time.process_time()
    with pytest.raises(Problem) as caught:
        call(*args, **kw)
    return caught.value, time.process_time() - started


def test_a_csv_header_of_40000_columns_is_refused_at_once() -> None:
    header = ",".join(f"c{i}" for i in range(40_000))
    body = f"{header}\n{','.join('x' * 40_000)}\n".encode()
    problem, took = refused(parse_job_csv, body, {"template": "{c1}"}, CATALOG, max_items=10)
    assert problem.errors[0].field == "header" and "at most 1,000" in problem.errors[0].message
    assert took < 1.0  # it took 24 s when duplicates were looked for with list.count


def test_a_duplicate_column_is_named_among_the_most_columns_allowed() -> None:
    columns = [f"c{i}" for i in range(1000)]
    columns[-1] = "c0"
    body = (",".join(columns) + "\n" + ",".join("x" for _ in columns) + "\n").encode()
    problem, _ = refused(parse_job_csv, body, {"template": "{c1}"}, CATALOG, max_items=10)
    assert problem.errors[0].field == "header" and "'c0'" in problem.errors[0].message


def test_more_items_than_a_job_holds_are_refused_before_the_rest_is_read() -> None:
    body = b'{"items":[' + b"{}," * 2_000_000 + b"{}]}"
    problem, took = refused(parse_job_json, body, CATALOG, max_items=1000)
    assert problem.status == 422 and problem.errors[0].field == "items"
    assert "1,001 items or more" in problem.detail
    assert took < 1.0


def test_a_body_too_dense_to_hold_is_refused_while_it_is_read() -> None:
    body = b'{"items":[{"prompt":"a","images":[' + b"0," * 3_000_000 + b"0]}]}"
    problem, took = refused(parse_job_json, body, CATALOG, max_items=1000)
    assert problem.status == 413 and problem.errors[0].field == "body"
    assert took < 5.0


def test_values_nested_deeper_than_a_job_are_refused() -> None:
    body = b'{"labels":' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}"
    problem, _ = refused(parse_job_json, body, CATALOG, max_items=10)
    assert problem.status == 422 and "nest more than" in problem.errors[0].message


@pytest.mark.parametrize(
    ("body", "field", "index"),
    [
        (b'{"model":"gpt-image-2","model":"gpt-image-2"}', "model", None),
        (b'{"defaults":{"n":1,"n":2},"items":[{"prompt":"x"}]}', "defaults.n", None),
        (b'{"items":[{"prompt":"x"},{"prompt":"y","prompt":"z"}]}', "items[1].prompt", 1),
        (b'{"template":"{a}","rows":[{"a":"x","a":"y"}]}', "rows[0].a", 0),
    ],
)
def test_a_key_given_twice_is_named(body: bytes, field: str, index: int | None) -> None:
    problem, _ = refused(parse_job_json, body, CATALOG, max_items=10)
    assert problem.status == 422
    assert (problem.errors[0].field, problem.errors[0].index) == (field, index)
    assert "appears twice" in problem.errors[0].message


def test_rendered_prompts_count_what_the_template_adds_against_the_body_budget() -> None:
    rows = "title\n" + "mug\n" * 200
    template = "x" * 10_000 + " {title}"
    problem, _ = refused(
        parse_job_csv,
        rows.encode(),
        {"template": template},
        CATALOG,
        max_items=1000,
        prompt_bytes=1_000_000,
    )
    assert problem.status == 413 and problem.errors[0].field == "template"
    # A prompt column used as it is adds nothing: the body already holds it.
    body = ("prompt\n" + ("p" * 9000 + "\n") * 200).encode()
    spec = parse_job_csv(body, {}, CATALOG, max_items=1000, prompt_bytes=1000)
    assert len(spec.items) == 200
