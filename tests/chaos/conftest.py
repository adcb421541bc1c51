"""Chaos drills (``make test-chaos``, their own CI step): deselected unless ``-m chaos`` selects
them, since each starts whole stacks and waits out the leases its kills leave behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.drill import Drill

# The drills that take longest start first, so none is left running alone at the end (the
# sync lane re-sends a slice lost with its worker after up to two minutes).
_LONGEST_FIRST = ("[sync.", "test_stalls.py", "[finalize.", "[webhook.", "test_redis.py")


def _order(item: pytest.Item) -> int:
    found = [i for i, part in enumerate(_LONGEST_FIRST) if part in item.nodeid]
    return found[0] if found else len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr") or ""):
        items.sort(key=_order)
        return
    deselected = [item for item in items if item.get_closest_marker("chaos")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("chaos")]


@pytest.fixture
def make_drill(tmp_path: Path) -> Iterator[Callable[..., Drill]]:
    drills: list[Drill] = []

    def make(**kw: bool) -> Drill:
        drill = Drill(tmp_path / f"drill{len(drills)}", **kw)
        drills.append(drill)
        return drill

    yield make
    for drill in drills:
        drill.stop()
