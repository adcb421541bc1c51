"""What is learned per model, in a real Redis: batch refusals that expire, and output tokens that
estimates use for models whose token counts OpenAI does not publish."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from service.catalog import load_catalog
from service.context import Context, build_context
from service.jobs import intake
from service.models import capability
from service.settings import Settings

SUNBURST = "gpt-image-2.6-sunburst"


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Iterator[Context]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        data_dir=tmp_path,
        openai_base_url="http://127.0.0.1:9/v1",
        openai_api_key="sk-test",
    )
    context = build_context(settings, enqueue=lambda *a: None)
    context.clock = lambda: dt.date(2026, 6, 1)
    yield context
    context.redis.close()


def test_a_batch_refusal_is_learned_once_and_expires(redis_client: redis.Redis) -> None:
    catalog = load_catalog()
    assert capability.batch_capable(redis_client, catalog, "gpt-image-2")
    message = "The model 'gpt-image-2' is not supported by the Batch API."
    assert capability.is_batch_refusal("unsupported_model", message)
    # The same code for an endpoint the model does not offer is not about batches.
    assert not capability.is_batch_refusal("unsupported_model", "does not support /v1/x")
    ttl = dt.timedelta(seconds=2)
    learned = capability.learn_not_batch_capable
    assert learned(redis_client, "gpt-image-2", batch_id="batch_1", message=message, ttl=ttl)
    assert not learned(redis_client, "gpt-image-2", batch_id="batch_2", message=message, ttl=ttl)
    assert not capability.batch_capable(redis_client, catalog, "gpt-image-2")
    refusal = capability.batch_refusals(redis_client, ["gpt-image-2", SUNBURST])
    assert set(refusal) == {"gpt-image-2"} and refusal["gpt-image-2"]["batch_id"] == "batch_1"
    assert refusal["gpt-image-2"]["until"] is not None
    assert 0 < redis_client.pttl("ib:models:batch-unsupported:gpt-image-2") <= 2000
    # The catalog's own `batch = false` needs nothing learned.
    assert not capability.batch_capable(redis_client, catalog, "gpt-image-2.5-flare")


def test_observed_tokens_make_a_decaying_average(redis_client: redis.Redis) -> None:
    for tokens in (600, 800):  # a plain mean at first
        capability.observe_tokens(redis_client, SUNBURST, "1024x1024", "low", tokens, 1)
    got = capability.learned_tokens(redis_client, SUNBURST)
    assert got == {("1024x1024", "low"): capability.Learned(700, 2)}
    # Two images in one item count as one observation of tokens per image.
    capability.observe_tokens(redis_client, SUNBURST, "1024x1024", "low", 2 * 1000, 2)
    assert capability.learned_tokens(redis_client, SUNBURST)[("1024x1024", "low")].tokens == 800
    for _ in range(50):
        capability.observe_tokens(redis_client, SUNBURST, "1024x1024", "low", 2000, 1)
    # Past ten samples a new one weighs 0.1: the average follows the new level.
    after = capability.learned_tokens(redis_client, SUNBURST)[("1024x1024", "low")]
    assert 1990 <= after.tokens <= 2000 and after.samples == 53


def body(model: str, n: int = 4, quality: str = "low") -> bytes:
    items: list[dict[str, Any]] = [{"id": f"s{i}", "prompt": f"mug {i}"} for i in range(n)]
    job = {
        "model": model,
        "mode": "auto",  # the 2.6 models have no batch support in the catalog
        "defaults": {"size": "1024x1024", "quality": quality},
        "items": items,
    }
    return orjson.dumps(job)


def test_an_estimate_says_whether_its_tokens_are_published_or_learned(ctx: Context) -> None:
    def estimate(model: str, quality: str = "low") -> dict[str, Any]:
        spec = intake.parse_body(ctx, body(model, quality=quality), "application/json", {})
        return intake.estimate(ctx, spec).to_dict()

    published = estimate("gpt-image-2")
    assert published["token_counts"] == {"source": "published", "samples": 0}
    assert published["tokens"]["image_output"] == 4 * 196

    guessed = estimate(SUNBURST)
    assert guessed["token_counts"] == {"source": "unpublished", "samples": 0}
    for _ in range(3):
        capability.observe_tokens(ctx.redis, SUNBURST, "1024x1024", "low", 664, 1)
    learned = estimate(SUNBURST)
    assert learned["token_counts"] == {"source": "learned", "samples": 3}
    assert learned["tokens"]["image_output"] == 4 * 664
    assert learned["usd"]["sync"] > guessed["usd"]["sync"]
    # Nothing was seen at medium: a stand-in for it, learned for low.
    mixed_body = orjson.loads(body(SUNBURST))
    mixed_body["items"][0]["quality"] = "medium"
    spec = intake.parse_body(ctx, orjson.dumps(mixed_body), "application/json", {})
    mixed = intake.estimate(ctx, spec).to_dict()
    assert mixed["token_counts"] == {"source": "partly_learned", "samples": 3}
