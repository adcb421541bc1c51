"""Tokens and money: usage parsing, exact nano-dollar costs, and estimates from the catalog."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from service.catalog import EDITS, GENERATIONS, Catalog, cached_catalog, load_catalog
from service.jobs.spec import ItemSpec, parse_job_json
from service.pricing import (
    KINDS,
    TIERS,
    Tokens,
    cost_nanousd,
    cost_usd,
    estimate_item,
    estimate_job,
    usage_tokens,
)

CAT = cached_catalog()
GPT2 = CAT.models["gpt-image-2"]
GPT15 = CAT.models["gpt-image-1.5"]

# o200k_base counts of the prompts below (checked by hand against the tokenizer) and the
# catalog's prompt overhead of 6 tokens per request.
MUG = "Studio photo of a red ceramic mug"  # 7 tokens
SHELF = "The same mug on a kitchen shelf"  # 7 tokens
CUP = "a blue cup"  # 3 tokens


def item(index: int, prompt: str, endpoint: str = GENERATIONS, **params: object) -> ItemSpec:
    model = params.pop("model", "gpt-image-2")
    return ItemSpec(index, f"i{index}", endpoint, {"model": model, "prompt": prompt, **params})


# ------------------------------------------------------------------------------------------
# Tokens and usage


def test_constants() -> None:
    assert KINDS == ("text_input", "image_input", "image_output", "text_output")
    assert TIERS == ("batch", "sync")
    assert CAT.prompt_overhead_tokens == 6


def test_tokens_arithmetic() -> None:
    a = Tokens(1, 2, 3, 4)
    b = Tokens(text_input=10, image_output=100)
    assert a + b == Tokens(11, 2, 103, 4) and a == Tokens(1, 2, 3, 4)
    assert a.add(b) is a and a == Tokens(11, 2, 103, 4)
    assert a.total == 120 and a.input == 13
    assert a.as_dict() == {
        "text_input": 11,
        "image_input": 2,
        "image_output": 103,
        "text_output": 4,
    }
    assert Tokens.from_dict(a.as_dict()) == a
    assert Tokens.from_dict({"image_output": 5}) == Tokens(image_output=5)


def test_usage_with_details() -> None:
    usage = {
        "input_tokens": 1050,
        "input_tokens_details": {"text_tokens": 26, "image_tokens": 1024},
        "output_tokens": 300,
        "output_tokens_details": {"image_tokens": 272, "text_tokens": 28},
        "total_tokens": 1350,
    }
    assert usage_tokens(usage) == Tokens(26, 1024, 272, 28)


def test_usage_without_details() -> None:
    assert usage_tokens({"input_tokens": 13, "output_tokens": 196, "total_tokens": 209}) == Tokens(
        text_input=13, image_output=196
    )
    # The batch-level usage shape: details without a text/image split.
    batch_level = {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 196,
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    assert usage_tokens(batch_level) == Tokens(text_input=40, image_output=196)


def test_usage_details_short_of_the_totals_never_undercount() -> None:
    usage = {
        "input_tokens": 60,
        "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
        "output_tokens": 200,
        "output_tokens_details": {"image_tokens": 196},
    }
    tokens = usage_tokens(usage)
    assert tokens == Tokens(text_input=50, image_input=10, image_output=200)
    assert tokens.total == 260


def test_usage_missing_or_corrupt() -> None:
    assert usage_tokens(None) == Tokens() and usage_tokens({}) == Tokens()
    assert usage_tokens({"input_tokens": None, "output_tokens": 5}) == Tokens(image_output=5)
    for bad in (
        {"input_tokens": "5"},
        {"output_tokens": -1},
        {"input_tokens": True},
        {"output_tokens": 1.5},
    ):
        with pytest.raises(ValueError, match="whole number"):
            usage_tokens(bad)
    with pytest.raises(ValueError):
        usage_tokens({"input_tokens": 5, "input_tokens_details": {"text_tokens": "x"}})


# ------------------------------------------------------------------------------------------
# Prices


def test_cost_of_one_token_of_each_kind() -> None:
    one = Tokens(1, 1, 1, 1)
    # gpt-image-2: $5, $8, $30, $10 per 1M -> 5000, 8000, 30000, 10000 nano-dollars per token.
    assert cost_nanousd(one, GPT2, CAT, "sync") == 53_000
    assert cost_nanousd(one, GPT2, CAT, "batch") == 26_500
    assert cost_usd(one, GPT2, CAT, "batch") == Decimal("0.0000265")
    with pytest.raises(ValueError):
        cost_nanousd(one, GPT2, CAT, "flex")


def test_published_example_gpt_image_2_high_batch() -> None:
    # facts §4.3: gpt-image-2 1024x1024 high (7024 tokens) in batch costs about $0.105.
    cost = cost_usd(Tokens(image_output=7024), GPT2, CAT, "batch")
    assert cost == Decimal("0.10536")
    assert isinstance(cost, Decimal)


def _fractional_catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        """
default_model = "cheap"
batch_discount = 0.5
prompt_overhead_tokens = 0

[models."cheap"]
created = 1
batch = true
endpoints = ["/v1/images/generations"]
sizes = ["auto", "1024x1024"]
qualities = ["auto", "low"]
formats = ["png"]
output_tokens = "gpt-image-2"
input_images = "patches"
price = { text_input = 0.001, image_input = 0.2, image_output = 0.0013, text_output = 0.0 }
"""
    )
    return load_catalog(path)


def test_nanousd_is_exact_with_fractional_prices(tmp_path: Path) -> None:
    catalog = _fractional_catalog(tmp_path)
    model = catalog.models["cheap"]
    # 0.0013 $/M is 1.3 nano-dollars a token: 75 tokens are exactly 97.5, rounded to even 98,
    # where binary floating point makes 75 * 0.0013 * 1000 = 97.49999999999999 and rounds to 97.
    assert cost_nanousd(Tokens(image_output=10), model, catalog, "sync") == 13
    assert cost_nanousd(Tokens(image_output=75), model, catalog, "sync") == 98
    # 0.2 $/M is 200 nano-dollars a token, 100 in batch: exact, whatever 0.2 is in binary.
    assert cost_nanousd(Tokens(image_input=3), model, catalog, "batch") == 300
    # 0.001 $/M in batch is half a nano-dollar a token: rounded half to even per kind.
    assert [cost_nanousd(Tokens(text_input=n), model, catalog, "batch") for n in (1, 2, 3, 5)] == [
        0,
        1,
        2,
        2,
    ]
    # Kinds are rounded each on its own, then summed.
    assert cost_nanousd(Tokens(text_input=3, image_output=10), model, catalog, "batch") == 2 + 6


def test_per_line_costs_add_up_to_the_cost_of_the_sum() -> None:
    rng = random.Random(5)
    total = Tokens()
    spent = {tier: 0 for tier in TIERS}
    for _ in range(2000):
        line = Tokens(rng.randrange(5, 400), rng.randrange(0, 5000), rng.randrange(150, 15000), 0)
        total.add(line)
        for tier in TIERS:
            spent[tier] += cost_nanousd(line, GPT2, CAT, tier)
    for tier in TIERS:
        assert spent[tier] == cost_nanousd(total, GPT2, CAT, tier)
    assert spent["batch"] * 2 == spent["sync"]


# ------------------------------------------------------------------------------------------
# Estimates from the catalog tables


def test_estimate_of_a_generation() -> None:
    tokens = estimate_item(item(0, MUG, size="1024x1024", quality="low"), CAT)
    assert tokens == Tokens(text_input=7 + 6, image_output=196)


@pytest.mark.parametrize(
    ("size", "quality", "per_image"),
    [
        ("1024x1024", "low", 196),
        ("1024x1024", "medium", 1756),
        ("1024x1024", "high", 7024),
        ("1536x1024", "high", 5488),
        ("1024x1536", "low", 158),
        ("2048x2048", "medium", 3568),
        ("3840x2160", "high", 13342),
        (None, None, 1756),  # auto size is 1024x1024, auto quality is medium
        ("auto", "auto", 1756),
    ],
)
def test_gpt_image_2_output_tokens(size: str | None, quality: str | None, per_image: int) -> None:
    params = {k: v for k, v in (("size", size), ("quality", quality)) if v is not None}
    assert estimate_item(item(0, CUP, n=3, **params), CAT).image_output == per_image * 3


def test_table_model_and_edits() -> None:
    gen = item(0, CUP, model="gpt-image-1.5", size="1024x1536", quality="medium")
    assert estimate_item(gen, CAT) == Tokens(text_input=3 + 6, image_output=1584)
    # Edits: each reference is estimated as a 1024x1024 image; the mask is not an input image.
    edit15 = item(
        1, CUP, EDITS, model="gpt-image-1.5", images=["s3://b/1", "s3://b/2"], mask="s3://m"
    )
    assert estimate_item(edit15, CAT).image_input == 2 * 194  # 65 + 129 x 1 tile
    edit2 = item(2, CUP, EDITS, images=["s3://b/1"], quality="low")
    assert estimate_item(edit2, CAT) == Tokens(text_input=9, image_input=1024, image_output=196)


def test_estimate_of_a_job_in_usd() -> None:
    items = [
        item(0, MUG, size="1024x1024", quality="low"),
        item(
            1, SHELF, EDITS, images=["s3://b/1", "s3://b/2"], size="1536x1024", quality="high", n=2
        ),
        item(2, CUP),
    ]
    est = estimate_job(items, CAT)
    text = (7 + 6) + (7 + 6) + (3 + 6)
    image_in = 2 * 1024
    image_out = 196 + 2 * 5488 + 1756
    assert est.tokens == Tokens(text_input=text, image_input=image_in, image_output=image_out)
    assert (est.items, est.images) == (3, 4)
    # tokens x catalog price per 1M, and batch is half of sync.
    sync_usd = (text * 5.0 + image_in * 8.0 + image_out * 30.0) / 1_000_000
    assert est.usd_sync == pytest.approx(sync_usd, abs=1e-12)
    assert est.usd_batch == pytest.approx(sync_usd * 0.5, abs=1e-12)
    assert est.nanousd_sync == text * 5000 + image_in * 8000 + image_out * 30000
    assert est.nanousd_batch * 2 == est.nanousd_sync
    assert est.nanousd("batch") == est.nanousd_batch
    assert est.to_dict() == {
        "items": 3,
        "images": 4,
        "tokens": {
            "text_input": text,
            "image_input": image_in,
            "image_output": image_out,
            "text_output": 0,
        },
        "usd": {"batch": est.usd_batch, "sync": est.usd_sync},
        # gpt-image-2's counts are published (its calculator): nothing learned is used.
        "token_counts": {"source": "published", "samples": 0},
    }
    summed = Tokens()
    for one in items:
        summed.add(estimate_item(one, CAT))
    assert summed == est.tokens


def test_estimate_of_a_parsed_job_and_mixed_models() -> None:
    body = {
        "defaults": {"size": "1024x1024", "quality": "low"},
        "items": [{"id": "sku-1001", "prompt": MUG}, {"id": "sku-1002", "prompt": MUG}],
    }
    spec = parse_job_json(orjson.dumps(body), CAT, max_items=10)
    est = estimate_job(spec.items, CAT)
    assert est.tokens == Tokens(text_input=26, image_output=392)
    assert est.usd_batch == pytest.approx((26 * 5 + 392 * 30) / 1e6 / 2)

    mixed = [item(0, CUP, quality="low"), item(1, CUP, model="gpt-image-1.5", quality="low")]
    est = estimate_job(mixed, CAT)
    assert est.by_model["gpt-image-2"].image_output == 196
    assert est.by_model["gpt-image-1.5"].image_output == 272
    assert est.nanousd_sync == (9 * 5000 + 196 * 30000) + (9 * 5000 + 272 * 32000)


def test_empty_estimate_and_unknown_model() -> None:
    est = estimate_job([], CAT)
    assert (est.items, est.images, est.usd_batch, est.tokens) == (0, 0, 0.0, Tokens())
    with pytest.raises(KeyError):
        estimate_job([item(0, CUP, model="nope")], CAT)
    with pytest.raises(KeyError):
        estimate_item(item(0, CUP, model="nope"), CAT)
