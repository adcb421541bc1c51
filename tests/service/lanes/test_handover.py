"""Graceful handover in the lanes: a collect and a sync slice asked to hand over (as their worker's
SIGTERM asks) stop between units, release their lease and leave the rest to the next run, which
does only the rest. Real Redis, the simulator over HTTP and local storage; the handover is asked
from inside the storage's write, so it lands mid-file at a known place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import handover
from service.context import Context
from service.jobs import intake
from service.jobs import model as m
from service.jobs.spec import parse_job_json
from service.lanes import collect, plan, submit, sweep, sync
from service.redis import keys
from service.storage.port import Storage
from tests.support.context import make_context
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_instant_simulator
from tests.support.stack import job_body


class Writes:
    """The real storage, counting writes per key; after ``handover_after`` writes it asks this
    process for a handover, as a worker's SIGTERM would."""

    def __init__(self, inner: Storage, handover_after: int | None = None):
        self.inner, self.after = inner, handover_after
        self.puts: Counter[str] = Counter()

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> None:
        self.inner.put_bytes(key, data, **kw)
        self.puts[key] += 1
        if self.after is not None and sum(self.puts.values()) >= self.after:
            handover.request()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_instant_simulator(tmp_path_factory.mktemp("sim"), plain_images=True)
    yield handle
    handle.stop()


@pytest.fixture
def ctx(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[Context]:
    sim.reset()
    context = make_context(tmp_path, redis_url, sim.url, sync_concurrency=1)
    yield context
    context.redis.close()
    handover.reset()


def accept(ctx: Context, n: int, **extra: Any) -> m.Job:
    spec = parse_job_json(orjson.dumps(job_body(n, **extra)), ctx.catalog, max_items=1000)
    return intake.submit(ctx, spec, "default").job


def collectable(ctx: Context, job_id: str) -> int:
    (number,) = plan.plan_job(ctx, job_id)
    assert submit.submit_chunk(ctx, job_id, number) == "submitted"

    def ended() -> bool:
        sweep.sweep(ctx)
        chunk = ctx.store.chunk(job_id, number)
        return chunk is not None and chunk.status == m.CHUNK_COLLECTING

    wait_until(ended, timeout=30, message="the upstream batch to end")
    return number


def test_a_collect_hands_over_mid_file_and_the_next_resumes_after_its_cursor(
    ctx: Context,
) -> None:
    job = accept(ctx, 30)
    number = collectable(ctx, job.id)
    writes = Writes(ctx.storage, handover_after=5)
    ctx.storage = writes  # type: ignore[assignment]

    with pytest.raises(handover.Handover):
        collect.collect_chunk(ctx, job.id, number, upload_threads=2)
    # The lease is free at once (not after its expiry), the chunk still waits to be collected,
    # and the cursor names exactly the lines stored: the lines in hand were finished first.
    assert not ctx.redis.exists(keys.collect_lease(job.id, number))
    chunk = ctx.store.chunk(job.id, number)
    assert chunk is not None and chunk.status == m.CHUNK_COLLECTING
    saved = ctx.redis.get(keys.collect_cursor(job.id, number))
    assert saved is not None
    lines = int(saved.split()[1])
    stored = sum(writes.puts.values())
    assert 5 <= lines == stored < 30
    assert ctx.store.counts(job.id)["succeeded"] == stored

    # The next worker: no handover asked; it skips the lines before the cursor.
    handover.reset()
    writes.after = None
    result = collect.collect_chunk(ctx, job.id, number, upload_threads=2)
    assert result is not None
    assert (result.succeeded, result.duplicates) == (30 - stored, 0)
    assert len(writes.puts) == 30 and set(writes.puts.values()) == {1}  # every image once
    assert ctx.store.counts(job.id)["succeeded"] == 30
    assert not ctx.redis.exists(keys.collect_cursor(job.id, number))  # dropped when done


def test_a_cursor_of_another_output_file_is_ignored(ctx: Context) -> None:
    job = accept(ctx, 4)
    number = collectable(ctx, job.id)
    ctx.redis.set(keys.collect_cursor(job.id, number), "file-of-an-earlier-attempt 3")
    result = collect.collect_chunk(ctx, job.id, number)
    assert result is not None and result.succeeded == 4


def test_a_sync_slice_hands_over_between_items(ctx: Context, sim: SimulatorHandle) -> None:
    job = accept(ctx, 6, mode="sync")
    sync.fan_out(ctx, job.id)
    writes = Writes(ctx.storage, handover_after=2)
    ctx.storage = writes  # type: ignore[assignment]

    with pytest.raises(handover.Handover):
        sync.run_slice(ctx, job.id, 0, 6)
    assert not ctx.redis.exists(keys.sync_slice_lease(job.id, 0))
    # Two items were sent and stored; the other four were not sent, and wait queued.
    assert sim.stats()["sync"]["images"] == 2
    counts = ctx.store.counts(job.id)
    assert (counts["succeeded"], counts["queued"], counts["cancelled"]) == (2, 4, 0)
    assert ctx.budgets.spend.job_state(job.id)["reserved"] == 0

    handover.reset()
    writes.after = None
    assert sync.run_slice(ctx, job.id, 0, 6) == {"succeeded": 4, "failed": 0, "cancelled": 0}
    assert sim.stats()["sync"]["images"] == 6  # nothing sent twice
    assert len(writes.puts) == 6 and set(writes.puts.values()) == {1}
