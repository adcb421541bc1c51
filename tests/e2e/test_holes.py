"""Issue 15's holes, closed: each reproduced at its boundary against real workers, Redis and the
simulator, and each job checked for exactness against the simulator's bill."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from service.cli.stack import redis_server_binary
from service.jobs import model as js
from service.lanes import plan
from service.redis import keys
from tests.support.context import make_context
from tests.support.procs import Proc, free_port, start_server, wait_until
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

KINDS = ("text_input", "image_input", "image_output")


def upstream_batches(sim: Any, job_id: str) -> list[Any]:
    """Every batch upstream holds for the job (found by our metadata), duplicates included."""
    with sim.client() as client:
        return [
            b
            for b in client.batches.list(limit=100)
            if (b.metadata or {}).get("imagebatch_job") == job_id
        ]


def assert_exact(stack: Stack, sim: Any, job_id: str, n: int) -> dict[str, Any]:
    """Every image stored once, tokens equal to what upstream billed for the job's batches."""
    job = stack.wait_job(job_id, timeout=150)
    assert job["status"] == "succeeded", stack.logs()
    assert job["counts"]["succeeded"] == n
    manifest = stack.manifest(job_id)
    ids = Counter(line["id"] for line in manifest)
    assert len(ids) == n and set(ids.values()) == {1}
    root = stack.tmp / "storage" / "jobs" / job_id / "images"
    files = [p for p in root.glob("*") if not p.name.endswith(".meta.json")]
    assert len(files) == n
    billed: Counter[str] = Counter()
    stats = sim.stats()["batches"]
    for batch in upstream_batches(sim, job_id):
        billed.update(stats[batch.id]["tokens"])
    for kind in KINDS:
        assert job["tokens"][kind] == billed.get(kind, 0), (kind, job["tokens"], billed)
    return job


def test_a_planner_killed_between_planned_and_waiting_leaves_no_chunk_behind(
    make_simulator, make_stack, tmp_path: Path, redis_url: str, monkeypatch
):
    sim = make_simulator()
    env = {"IMAGEBATCH_BATCH_MAX_LINES": "10"}
    stack = make_stack(sim, env=env)
    stack.start_api()
    accepted = stack.submit(job_body(30))
    job_id = accepted["id"]

    # The planner dies right after marking its first chunk planned, before that chunk went on
    # the waiting set (what an old planner, killed at that boundary, left behind).
    class Killed(BaseException):
        pass

    def killed_after_planned(c: Any, jid: str, number: int) -> None:
        c.store.set_chunk_status_if(jid, number, [js.CHUNK_ASSEMBLING], js.CHUNK_PLANNED)
        raise Killed

    monkeypatch.setattr(plan, "close_chunk", killed_after_planned)
    ctx = make_context(
        tmp_path,
        redis_url,
        sim.url,
        batch_max_lines=10,
        storage_url=stack.env["IMAGEBATCH_STORAGE_URL"],
    )
    with pytest.raises(Killed):
        plan.plan_job(ctx, job_id)
    monkeypatch.undo()
    orphan = ctx.store.chunk(job_id, 1)
    assert orphan is not None and orphan.status == js.CHUNK_PLANNED and orphan.lines == 10
    assert ctx.store.waiting_chunks() == []

    # Real workers and beat take over: the plan message from intake plans the other 20 items;
    # the sweep finds the planned chunk that nobody owned.
    stack.start_worker()
    stack.start_beat()
    assert_exact(stack, sim, job_id, 30)
    assert len(upstream_batches(sim, job_id)) == 3  # one batch per chunk, none twice
    ctx.redis.close()


class DurableRedis:
    """A Redis server with an append-only file, killed with -9 and restarted on the same port."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self.start()

    def start(self) -> Proc:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--dir", str(self.tmp)]
        return start_server(args, self.port, self.tmp / "redis.log")

    def kill_and_restart(self, down: float) -> None:
        self.proc.kill(signal.SIGKILL)
        self.proc.popen.wait(10)
        time.sleep(down)  # the outage itself
        self.proc = self.start()

    def stop(self) -> None:
        self.proc.stop()


def test_workers_survive_redis_killed_and_restarted_during_their_tasks(
    make_simulator, make_stack, tmp_path: Path
):
    durable = DurableRedis(tmp_path / "durable-redis")
    sim = make_simulator(rate=40)
    stack = make_stack(sim, redis_url=durable.url, env={"IMAGEBATCH_BATCH_MAX_LINES": "10"})
    try:
        stack.start_api()
        workers = [stack.start_worker(name="w1"), stack.start_worker(name="w2")]
        stack.start_beat()
        accepted = stack.submit(job_body(120))
        rng = random.Random(15)
        for _ in range(6):
            # Killed at a random moment: during plans, submits, collects and sweeps.
            time.sleep(rng.uniform(0.3, 2.0))
            durable.kill_and_restart(rng.uniform(0.1, 1.5))
            for w in workers:
                assert w.alive(), w.log_text()[-4000:]
        assert_exact(stack, sim, accepted["id"], 120)
        for w in workers:
            assert w.alive(), w.log_text()[-4000:]
            log = w.log_text()
            assert "Unrecoverable error" not in log
            # A connection error never dropped a message (Celery's reject without requeue).
            assert "requeue=False" not in log
    finally:
        stack.stop()
        durable.stop()


def test_a_submitter_paused_past_its_lease_in_a_slow_create_makes_no_second_batch(
    make_simulator, make_stack, redis_url: str
):
    # Creates take 40 s: long enough for worker b to start and take the chunk over before
    # worker a's create lands upstream, even on a loaded machine.
    sim = make_simulator(create_delay=40)
    env = {
        "IMAGEBATCH_BATCH_MAX_LINES": "10",
        "IMAGEBATCH_LEASE_SECONDS": "3",
        "IMAGEBATCH_BATCH_CREATE_TIMEOUT_SECONDS": "60",
    }
    stack = make_stack(sim, env=env)
    stack.start_api()
    first = stack.start_worker(name="a")
    stack.start_beat()
    job_id = stack.submit(job_body(10))["id"]
    r = redis.Redis.from_url(redis_url)
    wait_until(
        lambda: r.hget(keys.chunk(job_id, 1), "create_started"),
        timeout=60,
        message="worker a to begin the batch create",
    )
    # Worker a is paused mid-create (its lease keeper with it) for longer than its 3 s lease;
    # worker b takes the chunk over while a's create is still on its way upstream.
    first.kill(signal.SIGSTOP)
    second = stack.start_worker(name="b")
    wait_until(
        lambda: "may still land" in second.log_text(),
        timeout=60,
        message="worker b to find the earlier create unresolved",
    )
    first.kill(signal.SIGCONT)
    assert_exact(stack, sim, job_id, 10)
    [only] = upstream_batches(sim, job_id)
    assert stack.job(job_id)["upstream_batches"][0]["batch_id"] == only.id
    assert stack.job(job_id)["duplicate_batches"] == []
    # Worker a's create answers when the simulator's delay is over, which may be after the job
    # ended: it then finds the lease gone and leaves the batch to the one who recorded it.
    wait_until(
        lambda: "lost the submit lease while creating" in first.log_text(),
        timeout=90,
        message="worker a to give up its late create",
    )
    r.close()
