"""Catalogs of the tests' own, so no test depends on today's date.

The shipped catalog shuts models down on real dates; a test that needs a model which is shut
down today (the tile-priced gpt-image-1 family, say) runs against a copy in which nothing is shut
down, and a test about shutting down passes its own ``today``.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.catalog import DEFAULT_CATALOG_FILE

_SHUTDOWN_LINE = re.compile(r"^shutdown_date\s*=.*\n", re.MULTILINE)


def catalog_without_shutdowns(directory: Path) -> Path:
    """A copy of the shipped catalog with every ``shutdown_date`` removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "catalog-no-shutdowns.toml"
    path.write_text(_SHUTDOWN_LINE.sub("", DEFAULT_CATALOG_FILE.read_text()))
    return path
