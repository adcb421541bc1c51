"""The sweep's housekeeping: temporary files a killed write left behind are removed once older
than the longest task may run (real Redis, local storage)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.context import Context
from service.lanes import sweep
from service.queues import LONGEST_TASK_SECONDS
from tests.support.context import make_context


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client) -> Iterator[Context]:
    redis_client.flushdb()
    context = make_context(tmp_path, redis_url)
    yield context
    context.redis.close()


def test_the_sweep_removes_temp_files_older_than_the_longest_task(ctx: Context) -> None:
    tmp = Path(ctx.settings.storage_location.removeprefix("file://")) / ".imagebatch-internal"
    tmp = tmp / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    killed, running = tmp / "killed-collect.tmp", tmp / "running-collect.tmp"
    killed.write_bytes(b"half an image")
    running.write_bytes(b"an image being written")
    # A collect may run up to LONGEST_TASK_SECONDS: one a little younger is left alone. Ages by
    # the clock that stamped the files (the process's may run ahead: the clock-ahead suite).
    now = running.stat().st_mtime
    past = now - LONGEST_TASK_SECONDS - 60
    os.utime(killed, (past, past))
    recent = now - LONGEST_TASK_SECONDS + 600
    os.utime(running, (recent, recent))
    assert sweep.sweep_temp(ctx) == 1
    assert not killed.exists() and running.exists()
    # Not looked at again on every sweep (a marker in Redis).
    killed.write_bytes(b"x")
    os.utime(killed, (past, past))
    assert sweep.sweep_temp(ctx) == 0 and killed.exists()
