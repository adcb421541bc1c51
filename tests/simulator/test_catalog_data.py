"""The shipped catalog the simulator (and the service) read: the 2.6 models and the 2026-12-01 shutdowns.

Nothing here depends on today's date: shutdowns are checked against explicit days.
"""

from __future__ import annotations

import datetime as dt

import pytest

from service.catalog import DEFAULT_CATALOG_FILE, CatalogError, load_catalog
from service.tokens import output_image_tokens

CATALOG = load_catalog()
SHUTDOWN_DAY = dt.date(2026, 12, 1)
NEW_REPLACEMENTS = ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare", "gpt-image-2")


@pytest.mark.parametrize("model_id", ["gpt-image-2.6-sunburst", "gpt-image-2.6-flare"])
def test_the_2_6_models_are_priced_as_gpt_image_2_and_not_batched_until_confirmed(model_id):
    model = CATALOG.models[model_id]
    ref = CATALOG.models["gpt-image-2"].price
    assert (
        model.price.text_input,
        model.price.cached_text_input,
        model.price.image_input,
        model.price.cached_image_input,
        model.price.image_output,
    ) == (ref.text_input, ref.cached_text_input, ref.image_input, ref.cached_image_input, 30.0)
    assert model.batch is False
    assert model.shutdown_date is None and not model.is_shut_down(dt.date(2999, 1, 1))
    assert model.qualities == CATALOG.models["gpt-image-2.5-flare"].qualities
    assert model.sizes == CATALOG.models["gpt-image-2.5-flare"].sizes and model.custom_sizes
    # Released 2026-11-04 (facts §7.1).
    assert dt.datetime.fromtimestamp(model.created, dt.UTC).date() == dt.date(2026, 11, 4)
    # Estimated with the gpt-image-2 formula, and marked as not OpenAI's own numbers.
    assert not model.token_counts_published and model.token_table == "unpublished"
    assert output_image_tokens(model, 1024, 1024, "low") == 196


def test_models_with_published_token_counts_are_marked_so_by_default():
    published = {m.id for m in CATALOG.models.values() if m.token_counts_published}
    assert {"gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-1.5", "gpt-image-1"} <= published
    assert not published & {
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-flare",
        "gpt-image-2.6-sunburst",
        "gpt-image-2.6-flare",
    }


@pytest.mark.parametrize(
    "model_id",
    ["gpt-image-1.5", "gpt-image-1.5-2025-12-16", "gpt-image-1-mini", "chatgpt-image-latest"],
)
def test_the_2026_12_01_shutdowns_name_the_2_6_models(model_id):
    model = CATALOG.models[model_id]
    assert model.shutdown_date == SHUTDOWN_DAY
    assert model.replacements == NEW_REPLACEMENTS
    assert not model.is_shut_down(SHUTDOWN_DAY - dt.timedelta(days=1))
    assert model.is_shut_down(SHUTDOWN_DAY)
    assert "'gpt-image-2.6-sunburst' or 'gpt-image-2.6-flare'" in model.shutdown_message()


def test_a_token_table_other_than_published_or_unpublished_is_a_catalog_error(tmp_path):
    bad = tmp_path / "catalog.toml"
    bad.write_text(
        DEFAULT_CATALOG_FILE.read_text().replace(
            'token_table = "unpublished"', 'token_table = "measured"', 1
        )
    )
    with pytest.raises(CatalogError, match="token_table"):
        load_catalog(bad)
