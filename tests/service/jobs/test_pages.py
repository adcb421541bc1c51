"""Item pages read from their cursor: a deep page of a long job is entered through the line index,
a rewritten object is caught and re-indexed, and filters by status and review page correctly.

Real Redis, local storage; items end through the lanes' own steps (tests/support/jobs.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.context import Context
from service.jobs import lines, pages, review, views
from service.redis import keys
from service.storage import request_key
from tests.support.context import make_context
from tests.support.jobs import ended_job, submit


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str) -> Iterator[Context]:
    context = make_context(tmp_path, redis_url)
    context.redis.flushdb()
    yield context
    context.redis.close()


def test_offsets_point_at_every_thousandth_line(ctx: Context) -> None:
    job = submit(ctx, 2500)
    offsets = lines.build_offsets(ctx, job.id, "request")
    assert len(offsets) == 3 and offsets[0] == 0
    with ctx.storage.open(request_key(job.id)) as fh:
        data = fh.read()
    for block, offset in enumerate(offsets):
        assert data[offset - 1 : offset] in (b"", b"\n")
        assert orjson.loads(data[offset:].split(b"\n", 1)[0])["index"] == block * lines.STEP
    assert [int(v) for v in ctx.redis.lrange(keys.job_line_offsets(job.id, "request"), 0, -1)] == (
        offsets
    )


def test_lines_from_any_start_match_a_full_read(ctx: Context) -> None:
    job = submit(ctx, 2100)
    for start in (0, 1, 999, 1000, 1001, 2099):
        got = list(lines.lines_from(ctx, job.id, "request", start))
        assert [n for n, _ in got] == list(range(start, 2100))
        assert orjson.loads(got[0][1])["index"] == start
    assert list(lines.lines_from(ctx, job.id, "request", 2100)) == []
    assert list(lines.lines_from(ctx, job.id, "request", 99_999)) == []


def test_a_rewritten_object_is_reindexed_not_misread(ctx: Context) -> None:
    job = submit(ctx, 2100)
    assert next(lines.lines_from(ctx, job.id, "request", 1500))[0] == 1500
    # A retry rewrites the request with a longer prompt early on: every later offset moves.
    key = request_key(job.id)
    with ctx.storage.open(key) as fh:
        rows = [orjson.loads(line) for line in fh.read().splitlines()]
    rows[3]["body"]["prompt"] = "a much longer prompt than before " * 20
    ctx.storage.put_bytes(
        key, b"".join(orjson.dumps(r) + b"\n" for r in rows), content_type="application/jsonl"
    )
    number, raw = next(lines.lines_from(ctx, job.id, "request", 1500))
    assert number == 1500 and orjson.loads(raw)["index"] == 1500


def test_manifest_pages_of_a_finished_job_are_read_from_their_cursor(ctx: Context) -> None:
    job = ended_job(ctx, 130, fail={5, 77, 128})
    assert job.is_final
    seen: list[str] = []
    cursor: int | None = 0
    while cursor is not None:
        items, cursor = views.items_page(ctx, job, None, cursor, 48)
        assert len(items) <= 48
        seen += [item["id"] for item in items]
    assert seen == [f"sku-{i}" for i in range(130)]
    failed, nxt = views.items_page(ctx, job, "failed", 0, 2)
    assert [i["id"] for i in failed] == ["sku-5", "sku-77"] and nxt == 128
    failed, nxt = views.items_page(ctx, job, "failed", nxt, 2)
    assert [i["id"] for i in failed] == ["sku-128"] and nxt is None


def test_a_filter_that_matches_little_reads_a_bounded_slice(ctx: Context) -> None:
    job = ended_job(ctx, 300, fail={290})
    found, lines_read = pages.page(ctx, job, 0, 10, status="failed", scan_limit=100)
    assert found.items == [] and found.next_cursor == 100 and lines_read == []
    found, _ = pages.page(ctx, job, 200, 10, status="failed", scan_limit=100)
    assert [i["id"] for i in found.items] == ["sku-290"] and found.next_cursor is None


def test_pages_of_a_running_job_carry_live_states_and_prompts(ctx: Context) -> None:
    job = ended_job(ctx, 70, finish=False, fail={3})
    assert not job.is_final
    found, reqs = pages.page(ctx, job, 60, 48)
    assert [i["index"] for i in found.items] == list(range(60, 70))
    assert all(i["status"] == "succeeded" and i["keys"] for i in found.items)
    assert reqs[0].body["prompt"] == "Studio photo of product 60 on white"


def test_review_decisions_show_in_pages_filters_counts_and_the_manifest(ctx: Context) -> None:
    job = ended_job(ctx, 40, fail={9})
    decisions = [
        review.Decision("sku-3", "rejected", "the mug is blue"),
        review.Decision("sku-30", "rejected", None, index=30),
        review.Decision("sku-4", "approved"),
    ]
    assert review.review(ctx, job, decisions) == {"reviewed": 3, "changed": 3}
    # Repeating the same call changes nothing and counts nothing twice.
    assert review.review(ctx, job, decisions)["changed"] == 0
    view = views.job_view(ctx, job)
    assert view["review"] == {"approved": 1, "rejected": 2, "unreviewed": 36}
    rejected, _ = views.items_page(ctx, job, None, 0, 10, review="rejected")
    assert [(i["id"], i["review"]["note"]) for i in rejected] == [
        ("sku-3", "the mug is blue"),
        ("sku-30", None),
    ]
    unreviewed, _ = views.items_page(ctx, job, None, 0, 100, review="unreviewed")
    assert len(unreviewed) == 36 and "sku-9" not in {i["id"] for i in unreviewed}
    served = [
        orjson.loads(line) for line in b"".join(views.stream_manifest(ctx, job.id)).splitlines()
    ]
    assert served[3]["review"]["decision"] == "rejected" and served[5]["review"] is None
    # Changing a decision moves the counts; clearing one forgets it.
    review.review(ctx, job, [review.Decision("sku-3", "approved")])
    review.clear(ctx, job, [30])
    assert views.job_view(ctx, job)["review"] == {"approved": 2, "rejected": 0, "unreviewed": 37}


def test_a_review_naming_a_failed_or_unknown_item_is_refused_whole(ctx: Context) -> None:
    from service.errors import Problem

    job = ended_job(ctx, 12, fail={2})
    with pytest.raises(Problem) as err:
        review.review(
            ctx,
            job,
            [
                review.Decision("sku-1", "approved"),
                review.Decision("sku-2", "rejected"),
                review.Decision("nope", "rejected"),
            ],
        )
    assert err.value.status == 422
    fields = [(e.field, e.id) for e in err.value.errors]
    assert fields == [("items[1].id", "sku-2"), ("items[2].id", "nope")]
    assert "failed" in err.value.errors[0].message
    assert views.job_view(ctx, job)["review"]["approved"] == 0  # nothing was written


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{", ""),
        (b"{}", "items"),
        (b'{"items": [{"decision": "approved"}]}', "items[0].id"),
        (b'{"items": [{"id": "a", "decision": "meh"}]}', "items[0].decision"),
        (b'{"items": [{"id": "a", "decision": "approved", "note": 3}]}', "items[0].note"),
        (b'{"items": [{"id": "a", "decision": "approved", "why": 1}]}', "items[0].why"),
    ],
)
def test_review_bodies_are_checked_field_by_field(body: bytes, field: str) -> None:
    from service.errors import Problem

    with pytest.raises(Problem) as err:
        review.parse_review_body(body)
    assert err.value.errors[0].field == field
