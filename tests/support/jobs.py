"""Jobs whose items ended, made through the domain's own steps, without upstream.

:func:`ended_job` submits through intake, puts every item in one chunk as plan would, then ends
each one as a lane does: images stored (:func:`service.lanes.items.store_images`) and usage
counted (:func:`~service.lanes.items.record_usage`), or a final failure recorded; then finalize
writes the manifest. Tests of what callers see of a job (items pages, review, the console) and
the console benchmark use it: the states and objects are the real ones, made in seconds.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Collection
from typing import Any

import orjson
from PIL import Image, ImageDraw

from service.context import Context
from service.jobs import intake
from service.jobs.model import Job
from service.jobs.spec import parse_job_json
from service.lanes import items
from service.lanes.finalize import finalize_job
from tests.support.stack import job_body

USAGE = {
    "input_tokens": 24,
    "output_tokens": 196,
    "input_tokens_details": {"text_tokens": 24, "image_tokens": 0},
    "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
}


def picture(text: str, size: int = 96) -> bytes:
    """A small PNG showing ``text`` on a colour of its own."""
    hue = sum(text.encode()) * 37 % 255
    img = Image.new("RGB", (size, size), (hue, 180 - hue // 2, 90 + hue // 3))
    ImageDraw.Draw(img).text((6, size // 2 - 6), text[:14], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def submit(ctx: Context, n: int, *, tenant: str = "default", **body: Any) -> Job:
    spec = parse_job_json(orjson.dumps(job_body(n, **body)), ctx.catalog, max_items=n + 1)
    return intake.submit(ctx, spec, tenant).job


def end_items(
    ctx: Context,
    job: Job,
    *,
    fail: Collection[int] = (),
    only: Collection[int] | None = None,
    same_picture: bytes | None = None,
) -> None:
    """End the job's items (``only`` these when given): failed if in ``fail``, else succeeded."""
    indexes = list(range(job.items)) if only is None else sorted(only)
    chunk = ctx.store.new_chunk(job.id, endpoint="/v1/images/generations", model=job.model)
    ctx.store.assign(job.id, chunk, indexes)
    state_of = dict(zip(indexes, ctx.store.item_states(job.id, indexes), strict=True))
    for index in indexes:
        state = state_of[index]
        assert state is not None
        if index in fail:
            error = {"code": "moderation_blocked", "message": "blocked by the safety system"}
            items.record_failure(ctx, job, chunk, index, error, "fail")
            continue
        blob = same_picture or picture(state.id)
        body = {
            "data": [{"b64_json": base64.b64encode(blob).decode()}],
            "output_format": "png",
            "size": "1024x1024",
            "quality": "low",
        }
        stored, _ = items.store_images(ctx, job, state.id, body)
        items.record_usage(ctx, job, chunk, index, dict(USAGE), stored, tier="batch")


def ended_job(
    ctx: Context,
    n: int,
    *,
    tenant: str = "default",
    fail: Collection[int] = (),
    finish: bool = True,
    same_picture: bytes | None = None,
    **body: Any,
) -> Job:
    """A job of ``n`` items, every one ended; finalized (manifest written) unless ``finish`` is
    False."""
    job = submit(ctx, n, tenant=tenant, **body)
    end_items(ctx, job, fail=fail, same_picture=same_picture)
    if finish:
        finalize_job(ctx, job.id)
    got = ctx.store.job(job.id)
    assert got is not None
    return got
