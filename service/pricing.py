"""Tokens and money: estimates before a run, actual cost from upstream ``usage`` after it.

Owns the token kinds we bill by (:data:`KINDS`), the tiers (:data:`TIERS`: batch is
``catalog.batch_discount`` of sync), the conversion of an ``ImagesResponse.usage`` into
:class:`Tokens`, and the price of tokens. Prices and token tables come from the catalog only.

Money is counted in integer nano-dollars (:func:`cost_nanousd`) so Redis counters add exactly
and never drift; USD figures are derived from them. Each kind is priced and rounded on its own
(half-to-even, to the nano-dollar), then summed: the same usage always costs the same integer.

Estimates (:func:`estimate_item`, :func:`estimate_job`) use the catalog's token tables:

* text input: the prompt's o200k_base tokens plus ``catalog.prompt_overhead_tokens``, once per
  request (``n`` images share one prompt);
* image output: ``output_image_tokens`` at the resolved size and quality, times ``n``;
* image input (edits): the pixels of a reference image are unknown until it is read, so each
  reference is estimated as a 1024x1024 image (``input_image_tokens(model, 1024, 1024)``); a
  mask is not counted as an input image. Edits also add a few text tokens per image upstream
  (~16-32, facts §4.2) that the estimate leaves out.

For a model whose token counts OpenAI does not publish (``token_table = "unpublished"``), a job
estimate uses the output tokens learned from observed ``usage`` per (size, quality) where there
are any (:mod:`service.models.capability`), and says which it used: the estimate's
``token_counts.source`` is ``published``, ``learned``, ``partly_learned`` or ``unpublished`` (the
catalog's stand-in formula, a guess).

Actual spend always comes from ``usage`` (:func:`usage_tokens`). Errors: a usage value that is
not a whole number raises ``ValueError`` (the caller decides what a corrupt upstream line means);
an item whose model is not in the catalog raises ``KeyError`` (intake never lets one through).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from service.catalog import Catalog, Model
from service.jobs.spec import ItemSpec
from service.models.capability import Learned
from service.tokens import encoding, input_image_tokens, output_image_tokens

KINDS: tuple[str, ...] = ("text_input", "image_input", "image_output", "text_output")
TIERS: tuple[str, ...] = ("batch", "sync")

NANO_PER_USD = 1_000_000_000
# Prices are USD per 1M tokens: one token at price p costs p * 1000 nano-dollars.
_NANO_PER_TOKEN_PER_PRICE = Decimal(NANO_PER_USD) / Decimal(1_000_000)
# Edits: the size every reference image is assumed to have until it is read.
ESTIMATE_INPUT_IMAGE_SIZE = (1024, 1024)


@dataclass(slots=True)
class Tokens:
    """Token counts by kind."""

    text_input: int = 0
    image_input: int = 0
    image_output: int = 0
    text_output: int = 0

    def add(self, other: Tokens) -> Tokens:
        """Add ``other`` into this one (in place); returns self."""
        self.text_input += other.text_input
        self.image_input += other.image_input
        self.image_output += other.image_output
        self.text_output += other.text_output
        return self

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.text_input + other.text_input,
            self.image_input + other.image_input,
            self.image_output + other.image_output,
            self.text_output + other.text_output,
        )

    @property
    def total(self) -> int:
        return self.text_input + self.image_input + self.image_output + self.text_output

    @property
    def input(self) -> int:
        """Input tokens (text + image): what the upstream batch queue limit counts."""
        return self.text_input + self.image_input

    def as_dict(self) -> dict[str, int]:
        return {
            "text_input": self.text_input,
            "image_input": self.image_input,
            "image_output": self.image_output,
            "text_output": self.text_output,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Tokens:
        """The inverse of :meth:`as_dict` (missing kinds are 0)."""
        return cls(*(_whole(raw.get(kind), kind) for kind in KINDS))


def usage_tokens(usage: Mapping[str, Any] | None) -> Tokens:
    """Tokens by kind from an ``ImagesResponse.usage``.

    ``input_tokens_details.text_tokens`` / ``image_tokens`` and ``output_tokens_details.
    image_tokens`` / ``text_tokens`` when present. Without details, ``input_tokens`` is text
    input and ``output_tokens`` image output. When the details add up to less than the totals,
    the rest is counted as text input / image output, so spend is never under-counted.
    """
    if not usage:
        return Tokens()
    input_total = _whole(usage.get("input_tokens"), "input_tokens")
    output_total = _whole(usage.get("output_tokens"), "output_tokens")
    tokens = Tokens()
    in_details = usage.get("input_tokens_details")
    if isinstance(in_details, Mapping) and (
        in_details.get("text_tokens") is not None or in_details.get("image_tokens") is not None
    ):
        tokens.text_input = _whole(in_details.get("text_tokens"), "text_tokens")
        tokens.image_input = _whole(in_details.get("image_tokens"), "image_tokens")
        tokens.text_input += max(0, input_total - tokens.text_input - tokens.image_input)
    else:
        tokens.text_input = input_total
    out_details = usage.get("output_tokens_details")
    if isinstance(out_details, Mapping) and (
        out_details.get("image_tokens") is not None or out_details.get("text_tokens") is not None
    ):
        tokens.image_output = _whole(out_details.get("image_tokens"), "image_tokens")
        tokens.text_output = _whole(out_details.get("text_tokens"), "text_tokens")
        tokens.image_output += max(0, output_total - tokens.image_output - tokens.text_output)
    else:
        tokens.image_output = output_total
    return tokens


def _whole(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"usage {name} must be a whole number of tokens, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Prices


def _rate_nano(price_per_million: float, factor: Decimal) -> Decimal:
    # repr() of a float is its shortest round-tripping decimal ("0.2", not 0.2000000000000000111),
    # which is the price as the operator wrote it in the catalog.
    return Decimal(repr(price_per_million)) * _NANO_PER_TOKEN_PER_PRICE * factor


def cost_nanousd(tokens: Tokens, model: Model, catalog: Catalog, tier: str) -> int:
    """What ``tokens`` cost on ``model`` at ``tier``, in integer nano-dollars.

    Each kind is ``tokens x price per 1M x 1000 x tier factor``, rounded half-to-even to the
    nano-dollar, and the kinds are summed.
    """
    factor = Decimal(repr(catalog.price_factor(tier)))
    total = 0
    for kind in KINDS:
        count = getattr(tokens, kind)
        if count:
            exact = count * _rate_nano(getattr(model.price, kind), factor)
            total += int(exact.to_integral_value(rounding=ROUND_HALF_EVEN))
    return total


def cost_usd(tokens: Tokens, model: Model, catalog: Catalog, tier: str) -> Decimal:
    """What ``tokens`` cost in USD: exactly :func:`cost_nanousd` / 1e9."""
    return Decimal(cost_nanousd(tokens, model, catalog, tier)).scaleb(-9)


def nanousd_to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


def usd_to_nanousd(usd: float) -> int:
    """USD to integer nano-USD, rounded to the nearest nano-dollar."""
    return round(usd * NANO_PER_USD)


# --------------------------------------------------------------------------------------------
# Estimates


def _model_of(item: ItemSpec, catalog: Catalog) -> Model:
    model = catalog.get(item.model)
    if model is None:
        raise KeyError(f"model '{item.model}' of item {item.index} is not in the catalog")
    return model


def _output_tokens(model: Model, item: ItemSpec) -> int:
    width, height = model.resolve_size(item.size)
    return output_image_tokens(model, width, height, model.resolve_quality(item.quality))


def _input_image_tokens(model: Model) -> int:
    return input_image_tokens(model, *ESTIMATE_INPUT_IMAGE_SIZE)


def estimate_item(item: ItemSpec, catalog: Catalog) -> Tokens:
    """The tokens one item is expected to use (see the module docstring for the method)."""
    model = _model_of(item, catalog)
    text = len(encoding().encode_ordinary(item.prompt)) + catalog.prompt_overhead_tokens
    images = len(item.body.get("images") or ())
    return Tokens(
        text_input=text,
        image_input=images * _input_image_tokens(model) if images else 0,
        image_output=_output_tokens(model, item) * item.n,
    )


def _learned_output_tokens(
    model: Model, item: ItemSpec, learned: Mapping[tuple[str, str], Learned] | None
) -> Learned | None:
    """What was learned for the item's (size, quality), for a model without published counts."""
    if model.token_counts_published or not learned:
        return None
    width, height = model.resolve_size(item.size)
    return learned.get((f"{width}x{height}", model.resolve_quality(item.quality)))


# What an estimate's output tokens rest on (``token_counts.source``).
PUBLISHED, LEARNED, PARTLY_LEARNED, UNPUBLISHED = (
    "published",
    "learned",
    "partly_learned",
    "unpublished",
)


@dataclass
class Estimate:
    """The expected tokens and price of a set of items, at both tiers."""

    tokens: Tokens
    usd_batch: float
    usd_sync: float
    items: int
    images: int  # output images (the sum of n)
    nanousd_batch: int = 0
    nanousd_sync: int = 0
    by_model: dict[str, Tokens] = field(default_factory=dict)
    # What the output tokens rest on, and how many observed items back the learned part.
    token_source: str = PUBLISHED
    learned_samples: int = 0
    # What result reuse is expected to save (service.jobs.reuse): the items and images above
    # are then only those left to make.
    reuse: dict[str, int] | None = None
    # The lane the job will run on ("batch" or "sync"), when known: the estimate then shows the
    # expected cost (that lane's price) beside the worst case (every item at the sync price, as
    # when a deadline sends the job to the sync lane).
    lane: str | None = None

    def nanousd(self, tier: str) -> int:
        if tier == "batch":
            return self.nanousd_batch
        if tier == "sync":
            return self.nanousd_sync
        raise ValueError(f"unknown tier {tier!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "items": self.items,
            "images": self.images,
            "tokens": self.tokens.as_dict(),
            "usd": {"batch": self.usd_batch, "sync": self.usd_sync}
            | (
                {}
                if self.lane is None
                else {
                    "expected": self.usd_sync if self.lane == "sync" else self.usd_batch,
                    "worst_case": self.usd_sync,
                }
            ),
            "token_counts": {"source": self.token_source, "samples": self.learned_samples},
        }
        if self.reuse is not None:
            out["reuse"] = self.reuse
        return out


# Prompts whose token count is kept while a job is estimated (jobs repeat a few prompts).
_PROMPT_CACHE_SIZE = 4096


def estimate_job(
    items: Iterable[ItemSpec],
    catalog: Catalog,
    learned: Mapping[str, Mapping[tuple[str, str], Learned]] | None = None,
) -> Estimate:
    """The estimate of a whole job (or any set of items, of one or several models).

    ``learned`` is model -> (size, quality) -> output tokens learned from ``usage``; it is used
    only for models whose token counts are not published.
    """
    encode = encoding().encode_ordinary
    overhead = catalog.prompt_overhead_tokens
    # Jobs repeat a handful of (model, size, quality) combinations; prompts sometimes repeat.
    output_cache: dict[tuple[str, str | None, str | None], int] = {}
    # For models without published counts: what each (model, size, quality) was learned as.
    sources: dict[tuple[str, str | None, str | None], Learned | None] = {}
    input_cache: dict[str, int] = {}
    prompt_cache: dict[str, int] = {}
    by_model: dict[str, Tokens] = {}
    models: dict[str, Model] = {}
    count = 0
    images = 0
    for item in items:
        count += 1
        body = item.body
        model_id = body["model"]
        model = models.get(model_id)
        if model is None:
            model = models[model_id] = _model_of(item, catalog)
            by_model[model_id] = Tokens()
        acc = by_model[model_id]
        prompt = body["prompt"]
        text = prompt_cache.get(prompt)
        if text is None:
            if len(prompt_cache) >= _PROMPT_CACHE_SIZE:
                # Bounded: the items are read one at a time, and the cache must not end up
                # holding every prompt of the job.
                prompt_cache.clear()
            text = prompt_cache[prompt] = len(encode(prompt)) + overhead
        acc.text_input += text
        key = (model_id, body.get("size"), body.get("quality"))
        out = output_cache.get(key)
        if out is None:
            seen = _learned_output_tokens(model, item, (learned or {}).get(model_id))
            out = output_cache[key] = seen.tokens if seen else _output_tokens(model, item)
            if not model.token_counts_published:
                sources[key] = seen
        n = body.get("n", 1)
        acc.image_output += out * n
        images += n
        refs = body.get("images")
        if refs:
            per_image = input_cache.get(model_id)
            if per_image is None:
                per_image = input_cache[model_id] = _input_image_tokens(model)
            acc.image_input += per_image * len(refs)
    total = Tokens()
    nano = {tier: 0 for tier in TIERS}
    for model_id, tokens in by_model.items():
        total.add(tokens)
        for tier in TIERS:
            nano[tier] += cost_nanousd(tokens, models[model_id], catalog, tier)
    return Estimate(
        tokens=total,
        usd_batch=nanousd_to_usd(nano["batch"]),
        usd_sync=nanousd_to_usd(nano["sync"]),
        items=count,
        images=images,
        nanousd_batch=nano["batch"],
        nanousd_sync=nano["sync"],
        by_model=by_model,
        token_source=_token_source(sources.values()),
        learned_samples=sum(seen.samples for seen in sources.values() if seen),
    )


def _token_source(seen: Iterable[Learned | None]) -> str:
    found = [s is not None for s in seen]
    if not found:
        return PUBLISHED
    if all(found):
        return LEARNED
    return PARTLY_LEARNED if any(found) else UNPUBLISHED
