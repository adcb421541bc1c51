"""The model catalog: models, what they accept, their token tables and prices.

The catalog is data (``service/data/catalog.toml``, or the operator's ``IMAGEBATCH_CATALOG_FILE``),
read once per process. The service validates and prices with it; the simulator accepts and bills
with it. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_CATALOG_FILE = Path(__file__).parent / "data" / "catalog.toml"

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"

# ASCII digits only and nothing after them: \d would take '١٠٢٤' and $ a trailing newline.
_SIZE_RE = re.compile(r"([0-9]{2,5})x([0-9]{2,5})", re.ASCII)

# Limits on custom WxH sizes for models with ``custom_sizes`` (facts §3.1).
_CUSTOM_MAX_EDGE = 3840
_CUSTOM_MIN_PIXELS = 655_360
_CUSTOM_MAX_PIXELS = 8_294_400

# Whether OpenAI publishes a model's token counts (``token_table`` in the catalog). Models
# without the key are "published": every model before the 2.5 family had a table or calculator.
TOKEN_TABLES = ("published", "unpublished")


class CatalogError(ValueError):
    """The catalog file itself is malformed."""


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens at the sync tier."""

    text_input: float
    image_input: float
    image_output: float
    text_output: float = 0.0
    cached_text_input: float = 0.0
    cached_image_input: float = 0.0


@dataclass(frozen=True)
class Model:
    id: str
    created: int
    owned_by: str
    batch: bool
    endpoints: tuple[str, ...]
    sizes: tuple[str, ...]
    custom_sizes: bool
    qualities: tuple[str, ...]
    default_quality: str
    auto_quality: str
    auto_size: str
    formats: tuple[str, ...]
    transparent_background: bool
    output_tokens: str
    input_images: str
    price: Prices
    output_tokens_table: dict[str, dict[str, int]] = field(default_factory=dict)
    shutdown_date: dt.date | None = None
    replacements: tuple[str, ...] = ()
    snapshot_of: str | None = None
    token_table: str = "published"

    @property
    def token_counts_published(self) -> bool:
        """False when the model's token counts are a stand-in formula, not OpenAI's own."""
        return self.token_table == "published"

    def is_shut_down(self, today: dt.date | None = None) -> bool:
        today = today or dt.date.today()
        return self.shutdown_date is not None and self.shutdown_date <= today

    def size_problem(self, size: str) -> str | None:
        """Why ``size`` is not accepted by this model, or None when it is."""
        if size in self.sizes:
            return None
        if not self.custom_sizes:
            return (
                f"size '{size}' is not supported by {self.id}; use one of {', '.join(self.sizes)}"
            )
        m = _SIZE_RE.fullmatch(size)
        if not m:
            return f"size {size!r} is not 'auto' or WIDTHxHEIGHT"
        w, h = int(m.group(1)), int(m.group(2))
        if w % 16 or h % 16:
            return f"size '{size}': both sides must be multiples of 16"
        if max(w, h) > _CUSTOM_MAX_EDGE:
            return f"size '{size}': the longest side may be at most {_CUSTOM_MAX_EDGE}"
        if max(w, h) > 3 * min(w, h):
            return f"size '{size}': the aspect ratio must be between 1:3 and 3:1"
        if not _CUSTOM_MIN_PIXELS <= w * h <= _CUSTOM_MAX_PIXELS:
            return (
                f"size '{size}': total pixels must be between {_CUSTOM_MIN_PIXELS:,} "
                f"and {_CUSTOM_MAX_PIXELS:,}"
            )
        return None

    def resolve_size(self, size: str | None) -> tuple[int, int]:
        """The pixel size an image of ``size`` comes out at ('auto' is the model's auto size)."""
        chosen = self.auto_size if size is None or size == "auto" else size
        w, h = chosen.split("x")
        return int(w), int(h)

    def resolve_quality(self, quality: str | None) -> str:
        """The quality an image is billed at ('auto' is the model's auto quality)."""
        q = quality or self.default_quality
        return self.auto_quality if q == "auto" else q

    def shutdown_message(self) -> str:
        names = " or ".join(f"'{r}'" for r in self.replacements) or "another model"
        when = self.shutdown_date.isoformat() if self.shutdown_date else "an earlier date"
        return f"model '{self.id}' was shut down on {when}; use {names} instead"


@dataclass(frozen=True)
class Catalog:
    default_model: str
    batch_discount: float
    prompt_overhead_tokens: int
    models: dict[str, Model]
    source: Path

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def price_factor(self, tier: str) -> float:
        """What share of the sync price a tier pays (``batch`` or ``sync``)."""
        if tier == "batch":
            return self.batch_discount
        if tier == "sync":
            return 1.0
        raise ValueError(f"unknown tier {tier!r}")


def _model(model_id: str, raw: dict[str, Any], all_raw: dict[str, dict[str, Any]]) -> Model:
    if "snapshot_of" in raw:
        base = dict(all_raw[raw["snapshot_of"]])
        base.update(raw)
        raw = base
    try:
        price = Prices(**raw["price"])
        shutdown = raw.get("shutdown_date")
        if isinstance(shutdown, str):
            shutdown = dt.date.fromisoformat(shutdown)
        token_table = raw.get("token_table", "published")
        if token_table not in TOKEN_TABLES:
            raise ValueError(f"token_table must be one of {TOKEN_TABLES}, not {token_table!r}")
        return Model(
            id=model_id,
            created=int(raw["created"]),
            owned_by=raw.get("owned_by", "system"),
            batch=bool(raw["batch"]),
            endpoints=tuple(raw["endpoints"]),
            sizes=tuple(raw["sizes"]),
            custom_sizes=bool(raw.get("custom_sizes", False)),
            qualities=tuple(raw["qualities"]),
            default_quality=raw.get("default_quality", "auto"),
            auto_quality=raw.get("auto_quality", "medium"),
            auto_size=raw.get("auto_size", "1024x1024"),
            formats=tuple(raw["formats"]),
            transparent_background=bool(raw.get("transparent_background", False)),
            output_tokens=raw["output_tokens"],
            input_images=raw["input_images"],
            price=price,
            output_tokens_table=raw.get("output_tokens_table", {}),
            shutdown_date=shutdown,
            replacements=tuple(raw.get("replacements", ())),
            snapshot_of=raw.get("snapshot_of"),
            token_table=token_table,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"catalog model '{model_id}' is malformed: {exc!r}") from exc


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read a catalog file (the shipped one when ``path`` is None)."""
    source = Path(path) if path else DEFAULT_CATALOG_FILE
    with source.open("rb") as f:
        raw = tomllib.load(f)
    models_raw: dict[str, dict[str, Any]] = raw.get("models", {})
    models = {mid: _model(mid, m, models_raw) for mid, m in models_raw.items()}
    default = raw.get("default_model", "gpt-image-2")
    if default not in models:
        raise CatalogError(f"default_model '{default}' is not in the catalog {source}")
    return Catalog(
        default_model=default,
        batch_discount=float(raw.get("batch_discount", 0.5)),
        prompt_overhead_tokens=int(raw.get("prompt_overhead_tokens", 0)),
        models=models,
        source=source,
    )


@lru_cache(maxsize=8)
def cached_catalog(path: str | None = None) -> Catalog:
    """The catalog for ``path``, read once per process."""
    return load_catalog(path)
