"""Fixtures for end-to-end tests: the simulator and the stack as real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import Stack


@pytest.fixture
def make_simulator(tmp_path: Path) -> Iterator[Callable[..., SimulatorHandle]]:
    started: list[SimulatorHandle] = []

    def make(**flags: Any) -> SimulatorHandle:
        flags = {"rate": 2000, "validate_seconds": 0, "finalize_seconds": 0, **flags}
        sim = start_simulator(tmp_path / f"sim{len(started)}", **flags)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def make_stack(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Stack]]:
    redis.Redis.from_url(redis_url).flushdb()
    stacks: list[Stack] = []

    def make(sim: SimulatorHandle, **kw: Any) -> Stack:
        stack = Stack(
            tmp_path / f"stack{len(stacks)}", kw.pop("redis_url", redis_url), sim.url, **kw
        )
        stack.tmp.mkdir(parents=True, exist_ok=True)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
