"""No create without the lease, and a batch made twice anyway is found, cancelled and counted.

Real Redis, the simulator over HTTP with slow creates (``--create-delay``), local storage; each
submitter is a thread calling the submit step as a worker's task does.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import metrics
from service.context import Context
from service.jobs import intake, views
from service.jobs import model as js
from service.jobs.spec import parse_job_json
from service.lanes import collect, duplicates, finalize, plan, submit, sweep
from service.queues import COLLECT_TASK, DUPLICATE
from service.redis import keys
from tests.support.context import make_context, recorder
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import job_body

KINDS = ("text_input", "image_input", "image_output")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    handle = start_simulator(
        tmp_path_factory.mktemp("sim"),
        rate=2000,
        validate_seconds=0,
        finalize_seconds=0,
        create_delay=2,
    )
    yield handle
    handle.stop()


@pytest.fixture
def contexts(
    tmp_path: Path, redis_url: str, redis_client: Any, sim: SimulatorHandle
) -> Iterator[tuple[Context, Context]]:
    """Two workers' contexts (A and B) on one Redis, storage and simulator."""
    redis_client.flushdb()
    made = [
        make_context(tmp_path, redis_url, sim.url, batch_max_lines=10, **settings)
        for settings in ({"batch_create_timeout_seconds": 10}, {"batch_create_timeout_seconds": 10})
    ]
    yield made[0], made[1]
    for c in made:
        c.redis.close()


def planned_chunk(ctx: Context, n: int = 6) -> tuple[str, int]:
    spec = parse_job_json(orjson.dumps(job_body(n)), ctx.catalog, max_items=1000)
    job_id = intake.submit(ctx, spec, "default").job.id
    [number] = plan.plan_job(ctx, job_id)
    return job_id, number


def tagged(sim: SimulatorHandle, job_id: str) -> list[Any]:
    with sim.client() as client:
        return [
            b
            for b in client.batches.list(limit=100)
            if (b.metadata or {}).get("imagebatch_job") == job_id
        ]


class Submitter(threading.Thread):
    """Worker A: runs the submit step in the background, keeping what it returned or raised."""

    def __init__(self, ctx: Context, job_id: str, number: int):
        super().__init__(daemon=True)
        self.ctx, self.job_id, self.number = ctx, job_id, number
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = submit.submit_chunk(self.ctx, self.job_id, self.number)
        except Exception as exc:
            self.result = exc


def create_under_way(ctx: Context, job_id: str, number: int) -> None:
    wait_until(
        lambda: ctx.store.chunk(job_id, number).create_started,
        timeout=20,
        message="worker A to start its create",
    )


def test_a_submitter_that_loses_its_lease_mid_create_records_nothing_and_nothing_is_made_twice(
    contexts: tuple[Context, Context], sim: SimulatorHandle
) -> None:
    a, b = contexts
    job_id, number = planned_chunk(a)
    worker_a = Submitter(a, job_id, number)
    worker_a.start()
    create_under_way(a, job_id, number)
    # A's lease lapses mid-create (paused, or cut off from Redis): B takes it. A's create has
    # not landed upstream yet, so B must not create: it waits for the outcome to be known.
    a.redis.delete(keys.submit_lock(job_id, number))
    assert submit.submit_chunk(b, job_id, number) == "unresolved"
    assert tagged(sim, job_id) == []
    # A's create lands; A no longer holds the lease, so it writes no batch id.
    worker_a.join(30)
    assert worker_a.result == "unresolved", worker_a.result
    chunk = b.store.chunk(job_id, number)
    assert chunk.batch_id is None and chunk.status == js.CHUNK_PLANNED
    # The next submit finds A's batch upstream and takes it: one batch, never two.
    assert submit.submit_chunk(b, job_id, number) == "submitted"
    [only] = tagged(sim, job_id)
    assert b.store.chunk(job_id, number).batch_id == only.id
    assert b.store.chunk(job_id, number).status == js.CHUNK_SUBMITTED


def test_a_holder_that_lost_its_lease_before_the_create_does_not_create(
    contexts: tuple[Context, Context], sim: SimulatorHandle, monkeypatch
) -> None:
    a, _ = contexts
    job_id, number = planned_chunk(a)
    upload = submit._upload_input

    def slow_upload(ctx: Context, job: js.Job, chunk: js.Chunk) -> str | None:
        file_id = upload(ctx, job, chunk)
        # Paused here past the lease: another worker took it.
        ctx.redis.set(keys.submit_lock(job_id, number), "another-worker", px=30_000)
        return file_id

    monkeypatch.setattr(submit, "_upload_input", slow_upload)
    assert submit.submit_chunk(a, job_id, number) == "lease-lost"
    assert tagged(sim, job_id) == []
    assert a.store.chunk(job_id, number).create_started is None


def test_a_batch_created_twice_is_cancelled_and_what_it_billed_is_counted(
    contexts: tuple[Context, Context], sim: SimulatorHandle
) -> None:
    a, b = contexts
    job_id, number = planned_chunk(a)
    worker_a = Submitter(a, job_id, number)
    worker_a.start()
    create_under_way(a, job_id, number)
    # Redis restarted and lost its last writes: A's lease and its create_started are gone, so
    # B cannot know a create is under way, and creates a second batch.
    a.redis.delete(keys.submit_lock(job_id, number))
    a.redis.hdel(keys.chunk(job_id, number), "create_started")
    assert submit.submit_chunk(b, job_id, number) == "submitted"
    worker_a.join(30)
    assert worker_a.result == "unresolved", worker_a.result
    made = tagged(sim, job_id)
    assert len(made) == 2
    chunk = b.store.chunk(job_id, number)
    assert chunk.create_uncertain and chunk.batch_id in {x.id for x in made}

    # Both end; the chunk's collect finds the other batch and the job waits for it.
    def ended() -> bool:
        sweep.sweep(b)
        return b.store.chunk(job_id, number).status == js.CHUNK_COLLECTING

    wait_until(ended, timeout=30, message="the chunk's batch to end")
    before = dict(b.redis.hgetall(keys.COUNTERS))
    collect.collect_chunk(b, job_id, number)
    assert b.store.counts(job_id)["succeeded"] == 6
    [dup] = [x.id for x in made if x.id != chunk.batch_id]
    assert views.job_view(b, b.store.job(job_id))["duplicate_batches"] == [
        {"batch_id": dup, "accounted": False, "tokens": None, "cost_usd": 0.0}
    ]
    assert finalize.finalize_job(b, job_id) is None  # not before the duplicate is counted
    field = f'{metrics.DUPLICATE_BATCHES}|{{"model":"gpt-image-2"}}'.encode()
    assert float(b.redis.hget(keys.COUNTERS, field) or 0) == float(before.get(field, 0)) + 1

    wait_until(
        lambda: sweep.sweep(b) is not None and recorder(b).named(DUPLICATE),
        timeout=30,
        message="the duplicate's accounting to be queued",
    )
    [(jid, n, bid)] = recorder(b).named(DUPLICATE)
    assert duplicates.account(b, jid, n, bid)
    assert not duplicates.account(b, jid, n, bid)  # a redelivered task counts nothing twice
    assert finalize.finalize_job(b, job_id) == "succeeded"

    view = views.job_view(b, b.store.job(job_id))
    billed: Counter[str] = Counter()
    stats = sim.stats()["batches"]
    for x in made:
        billed.update(stats[x.id]["tokens"])
    for kind in KINDS:
        assert view["tokens"][kind] == billed.get(kind, 0), kind
    [shown] = view["duplicate_batches"]
    assert shown["batch_id"] == dup and shown["accounted"]
    assert shown["tokens"]["image_output"] == stats[dup]["tokens"]["image_output"] > 0
    assert COLLECT_TASK in {name for name, *_ in recorder(b).sent}
