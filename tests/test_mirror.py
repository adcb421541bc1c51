"""Tests mirror the tree (ARCHITECTURE.md): every package of service/ and workers/ has a test
package at the same path under tests/ holding at least one test module, so a newcomer who opens
a package knows where its tests are, and a new package cannot land without any."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Sub-packages tested through their parent's tests (the routes, through tests/service/api).
COVERED_BY_PARENT = {"service/api/routes", "service/console/routes", "workers/tasks"}


def packages() -> list[str]:
    found = []
    for root in ("service", "workers"):
        for init in sorted((REPO / root).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO).as_posix()
            if rel != "service" and rel not in COVERED_BY_PARENT:
                found.append(rel)
    return found


def test_the_packages_are_found() -> None:
    assert {"service/jobs", "service/redis", "workers"} <= set(packages())


@pytest.mark.parametrize("package", packages())
def test_every_package_has_a_test_module(package: str) -> None:
    mirror = REPO / "tests" / package
    assert (mirror / "__init__.py").exists(), f"tests/{package}/ is missing"
    assert sorted(mirror.glob("test_*.py")), f"tests/{package}/ has no test module"


def test_the_exempt_packages_still_exist() -> None:
    # An exemption for a package that was removed or renamed would hide a missing mirror.
    for rel in COVERED_BY_PARENT:
        assert (REPO / rel / "__init__.py").exists(), rel
