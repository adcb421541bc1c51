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


def catalog_variant(
    directory: Path,
    name: str,
    *,
    drop: tuple[str, ...] = (),
    batch: dict[str, bool] | None = None,
    shutdowns: bool = True,
) -> Path:
    """A copy of the shipped catalog with models dropped, ``batch`` set per model, and
    (``shutdowns=False``) every ``shutdown_date`` removed; written to ``directory/name``."""
    text = DEFAULT_CATALOG_FILE.read_text()
    if not shutdowns:
        text = _SHUTDOWN_LINE.sub("", text)
    sections = re.split(r"(?m)^(?=\[)", text)
    kept = []
    for section in sections:
        header = section.split("\n", 1)[0]
        model = re.match(r'^\[models\."([^"]+)"', header)
        if model and model.group(1) in drop:
            continue
        if model and header == f'[models."{model.group(1)}"]' and model.group(1) in (batch or {}):
            value = "true" if (batch or {})[model.group(1)] else "false"
            if re.search(r"(?m)^batch\s*=", section):
                section = re.sub(r"(?m)^batch\s*=.*$", f"batch = {value}", section)
            else:
                section = section.replace("\n", f"\nbatch = {value}\n", 1)
        kept.append(section)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(kept))
    return path
