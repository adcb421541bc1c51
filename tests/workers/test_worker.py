"""A real worker process (``imagebatch worker``, prefork, the broker on the test Redis) retries a
task whose step failed transiently until it succeeds, and does not retry one that failed for good.

Tasks are counted two ways a user could: what they left behind (a finished job and its
manifest) and how often a task ran (the task duration histogram /metrics shows).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from service import metrics, queues
from service.context import Context
from service.jobs import intake
from service.jobs.spec import parse_job_json
from service.redis import keys
from service.storage import request_key
from tests.support.context import make_context
from tests.support.procs import Proc, free_port, wait_until
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def broker_url(redis_url: str) -> str:
    # A database of its own: other tests flush database 0 under a running worker's queues.
    url = redis_url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, broker_url: str
) -> Iterator[tuple[Proc, Path]]:
    tmp = tmp_path_factory.mktemp("worker")
    env = {
        "IMAGEBATCH_REDIS_URL": broker_url,
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp),
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "OPENAI_API_KEY": "sk-test",
    }
    args = [sys.executable, "-m", "service.cli", "worker", "--queues", "control"]
    proc = Proc([*args, "--concurrency", "1", "--name", "retry"], tmp / "worker.log", env=env)

    def ready() -> bool:
        assert proc.alive(), proc.log_text()[-3000:]
        return "ready." in proc.log_text()

    wait_until(ready, timeout=90, message="the worker to be ready")
    yield proc, tmp
    proc.stop()


@pytest.fixture
def ctx(worker: tuple[Proc, Path], broker_url: str) -> Iterator[Context]:
    # The same Redis database and storage directory as the worker.
    context = make_context(worker[1], broker_url)
    yield context
    context.redis.close()


def send(broker_url: str, task: str, *args: Any) -> None:
    queues.Enqueuer(queues.producer(broker_url))(task, *args)


def runs(ctx: Context, task: str) -> int:
    """How many times the task ran (every run, retries included, is one duration observed)."""
    labels = orjson.dumps({"task": task}).decode()
    value = ctx.redis.hget(keys.HISTOGRAMS, f"{metrics.TASK_DURATION}|{labels}|+Inf")
    return int(value or 0)


def new_job(ctx: Context, **extra: Any) -> str:
    spec = parse_job_json(orjson.dumps(job_body(2, **extra)), ctx.catalog, max_items=10)
    return intake.submit(ctx, spec, "default").job.id


def test_a_transient_failure_is_retried_by_the_worker_until_it_succeeds(
    worker: tuple[Proc, Path], ctx: Context, broker_url: str
) -> None:
    proc, tmp = worker
    before = runs(ctx, queues.FINALIZE)
    job_id = new_job(ctx)
    ctx.store.cancel_unsubmitted(job_id, [])  # every item final: the job can finalize
    # A directory where the manifest goes: storage cannot write it (a transient StorageError)...
    blocker = tmp / "storage" / "jobs" / job_id / "manifest.jsonl"
    blocker.mkdir(parents=True)
    send(broker_url, queues.FINALIZE, job_id)
    wait_until(
        lambda: "transient StorageError, retry 1" in proc.log_text(),
        timeout=60,
        message="the finalize task to fail transiently",
    )
    blocker.rmdir()  # ...until it can: the worker's retry then finishes the job
    job = wait_until(
        lambda: (j := ctx.store.job(job_id)) is not None and j.is_final and j,
        timeout=60,
        message="the retried finalize to finish the job",
    )
    assert job.status == "failed"  # every item was cancelled before it was sent
    assert ctx.storage.exists(f"jobs/{job_id}/manifest.jsonl")
    # The failed run and the retry that succeeded (observed as each run ends).
    wait_until(lambda: runs(ctx, queues.FINALIZE) - before == 2, timeout=30, message="two runs")


def test_a_permanent_failure_is_not_retried(
    worker: tuple[Proc, Path], ctx: Context, broker_url: str
) -> None:
    proc, _ = worker
    before = runs(ctx, queues.PLAN)
    job_id = new_job(ctx)
    ctx.storage.delete(request_key(job_id))  # the request is gone: planning can never work
    send(broker_url, queues.PLAN, job_id)
    wait_until(
        lambda: "ObjectNotFound" in proc.log_text(),
        timeout=60,
        message="the plan task to fail",
    )
    assert runs(ctx, queues.PLAN) - before == 1
    failed = [line for line in proc.log_text().splitlines() if queues.PLAN in line]
    assert any("raised unexpected" in line for line in failed), failed
    assert not any("Retry in" in line or "transient" in line for line in failed), failed
