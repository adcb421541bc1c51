"""A model upstream will not batch, learned from a failed batch: the steps called directly against
a real Redis, a simulator that refuses batches of gpt-image-2.6-sunburst, and local storage.

The catalog claims batch support for the model (a test catalog), as the shipped one might for a
model whose support upstream withdrew. Steps run the way task adapters call them, so a test can
repeat one (a redelivered task).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.catalog import cached_catalog
from service.context import Context
from service.jobs import intake
from service.jobs import model as js
from service.lanes import collect, finalize, plan, submit, sweep, sync
from service.models import capability
from service.queues import SYNC_ITEMS
from service.storage import manifest_key
from tests.support.catalog import catalog_variant
from tests.support.context import Recorder, make_context
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_instant_simulator

MODEL = "gpt-image-2.6-sunburst"


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return catalog_variant(
        tmp_path_factory.mktemp("catalog"), "batchable.toml", batch={MODEL: True}
    )


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, catalog_file: Path) -> Iterator[SimulatorHandle]:
    handle = start_instant_simulator(
        tmp_path_factory.mktemp("sim"), catalog_file=catalog_file, batch_unsupported=MODEL
    )
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle, catalog_file: Path
) -> Iterator[Context]:
    context = make_context(
        tmp_path,
        redis_url,
        sim.url,
        catalog_file=catalog_file,
        batch_max_lines=10,
        sync_max_items=5,
    )
    assert context.catalog.models[MODEL].batch  # the catalog claims batch support
    yield context
    context.redis.close()
    cached_catalog.cache_clear()


def accept(ctx: Context, n: int, mode: str) -> str:
    body = {
        "model": MODEL,
        "mode": mode,
        "defaults": {"size": "1024x1024", "quality": "low"},
        "items": [{"id": f"sku-{i}", "prompt": f"Studio photo of product {i}"} for i in range(n)],
    }
    return intake.submit_body(ctx, "default", orjson.dumps(body), "application/json", {}).job.id


def ended(ctx: Context, job_id: str, number: int) -> None:
    def done() -> bool:
        sweep.sweep(ctx)
        return ctx.store.chunk(job_id, number).status == js.CHUNK_COLLECTING  # type: ignore[union-attr]

    wait_until(done, timeout=30, message="the upstream batch to end")


def run_sync(ctx: Context, recorder: Recorder) -> None:
    """Run every sync task that was enqueued (fan-outs and slices), until none is left."""
    while todo := recorder.take(SYNC_ITEMS):
        for args in todo:
            if len(args) == 1:
                sync.fan_out(ctx, args[0])
            else:
                sync.run_slice(ctx, *args)


def test_an_auto_job_moves_to_the_sync_lane_each_item_once(
    ctx: Context, sim: SimulatorHandle
) -> None:
    recorder: Recorder = ctx.enqueue  # type: ignore[assignment]
    job_id = accept(ctx, 25, "auto")
    assert ctx.store.job(job_id).mode == "batch"  # type: ignore[union-attr]
    first, second, third = plan.plan_job(ctx, job_id)
    assert submit.submit_chunk(ctx, job_id, first) == "submitted"
    ended(ctx, job_id, first)
    batches_before = len(sim.stats()["batches"])

    assert collect.collect_chunk(ctx, job_id, first) is not None
    job = ctx.store.job(job_id)
    assert job is not None and job.mode == "sync" and job.requested_mode == "auto"
    assert not capability.batch_capable(ctx.redis, ctx.catalog, MODEL)
    states = ctx.store.item_states(job_id, list(range(25)))
    moved = [s for s in states if s and s.chunk == sync.SYNC_CHUNK]
    assert len(moved) == 10 and all(s.status == js.QUEUED for s in moved)
    assert ctx.store.chunk(job_id, first).status == js.CHUNK_DONE  # type: ignore[union-attr]
    # A redelivered collect finds the chunk done: nothing moves twice.
    ctx.store.update_chunk(job_id, first, status=js.CHUNK_COLLECTING)
    collect.collect_chunk(ctx, job_id, first)
    assert ctx.store.chunk(job_id, sync.SYNC_CHUNK).lines == 10  # type: ignore[union-attr]

    # The waiting chunks create no upstream batch: their items move too.
    assert submit.submit_chunk(ctx, job_id, second) == "rerouted"
    assert submit.submit_chunk(ctx, job_id, third) == "rerouted"
    assert submit.submit_chunk(ctx, job_id, third) == "skipped"  # a repeat does nothing
    assert len(sim.stats()["batches"]) == batches_before
    assert ctx.store.chunk(job_id, sync.SYNC_CHUNK).lines == 25  # type: ignore[union-attr]

    run_sync(ctx, recorder)
    assert ctx.store.counts(job_id) == {
        "pending": 0,
        "queued": 0,
        "succeeded": 25,
        "failed": 0,
        "cancelled": 0,
    }
    assert finalize.finalize_job(ctx, job_id) == "succeeded"
    # Upstream made each image once, on the images endpoint at the sync price.
    stats = sim.stats()
    assert stats["sync"]["images"] == 25
    assert ctx.store.spend(job_id)["cost:sync"] > 0 and not ctx.store.spend(job_id).get(
        "cost:batch"
    )


def test_with_the_refusal_learned_auto_goes_to_sync_and_batch_items_fail(
    ctx: Context, sim: SimulatorHandle
) -> None:
    recorder: Recorder = ctx.enqueue  # type: ignore[assignment]
    message = f"The model '{MODEL}' is not supported by the Batch API."
    ttl = ctx.settings.batch_unsupported_ttl
    capability.learn_not_batch_capable(
        ctx.redis, MODEL, batch_id="batch_x", message=message, ttl=ttl
    )
    batches_before = len(sim.stats()["batches"])

    auto = accept(ctx, 12, "auto")
    assert ctx.store.job(auto).mode == "sync"  # type: ignore[union-attr]

    batch = accept(ctx, 12, "batch")
    chunks = plan.plan_job(ctx, batch)
    for number in chunks:
        assert submit.submit_chunk(ctx, batch, number) == "rerouted"
    assert finalize.finalize_job(ctx, batch) == "failed"
    assert len(sim.stats()["batches"]) == batches_before
    manifest = read_manifest(ctx, batch)
    assert len(manifest) == 12
    assert {line["error"]["code"] for line in manifest} == {"model_not_batch_capable"}
    assert MODEL in manifest[0]["error"]["message"] and "auto" in manifest[0]["error"]["message"]

    run_sync(ctx, recorder)
    assert finalize.finalize_job(ctx, auto) == "succeeded"
    assert len(sim.stats()["batches"]) == batches_before


def read_manifest(ctx: Context, job_id: str) -> list[dict[str, Any]]:
    with ctx.storage.open(manifest_key(job_id)) as fh:
        return [orjson.loads(line) for line in fh if line.strip()]
