"""The console's tests run against a real API process with two tenants (tests/support/console.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.console import Console, two_tenant_api


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Console]:
    with two_tenant_api(tmp_path_factory.mktemp("console"), redis_url) as api:
        yield api
