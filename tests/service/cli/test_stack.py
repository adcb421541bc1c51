"""`imagebatch up` supervises its children: one that exits, with any status, is started again
after a backoff, and the others run on. Real child processes; the clock is passed in."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator

import pytest

from service.cli import stack as up

QUICK_EXIT = [sys.executable, "-c", "raise SystemExit(0)"]
RUNS = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def children() -> Iterator[up.Stack]:
    s = up.Stack()
    yield s
    s.stop()


def test_a_child_that_exits_zero_is_restarted_with_growing_backoff(children: up.Stack) -> None:
    children.start("worker", QUICK_EXIT, {})
    keeper = children.start("api", RUNS, {})
    worker = children.children[0]
    delays = []
    for _ in range(4):
        worker.proc.wait(10)
        now = time.monotonic()
        assert children.supervise(now) == []  # noticed: due after its backoff, not at once
        delay = worker.restart_at - now
        delays.append(delay)
        assert children.supervise(now + delay - 0.01) == []
        first_pid = worker.proc.pid
        assert children.supervise(now + delay) == ["worker"]
        assert worker.proc.pid != first_pid
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert keeper.poll() is None and children.children[1].restarts == 0  # untouched


def test_a_killed_child_is_restarted_and_the_backoff_caps(children: up.Stack) -> None:
    proc = children.start("worker", RUNS, {})
    child = children.children[0]
    child.restarts = 10  # it has crashed over and over
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    now = time.monotonic()
    children.supervise(now)
    assert child.restart_at == pytest.approx(now + up.RESTART_MAX_SECONDS)
    assert children.supervise(now + up.RESTART_MAX_SECONDS) == ["worker"]
    assert child.proc.poll() is None


def test_a_child_that_ran_long_enough_starts_over_at_the_first_backoff(children: up.Stack) -> None:
    proc = children.start("beat", RUNS, {})
    child = children.children[0]
    child.restarts = 5
    child.started -= up.STABLE_SECONDS  # it has run a minute since its last restart
    proc.terminate()
    proc.wait(10)
    now = time.monotonic()
    children.supervise(now)
    assert child.restart_at == pytest.approx(now + up.RESTART_FIRST_SECONDS)
