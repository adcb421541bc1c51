"""Image requests as plain functions: what is accepted, what it bills, how refusals read."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest
from PIL import Image

from service.catalog import EDITS, GENERATIONS, cached_catalog
from service.tokens import input_image_tokens, output_image_tokens, prompt_tokens
from simulator.errors import APIError
from simulator.generation import ImageMaker, probe_image
from simulator.images import Renderer

CATALOG = cached_catalog()


@pytest.fixture(scope="module")
def maker() -> ImageMaker:
    return ImageMaker(
        CATALOG,
        Renderer(),
        {"forbidden": "other", "gore": "violence"},
        today=lambda: dt.date(2026, 11, 21),
    )


def refusal(
    maker: ImageMaker, body: dict[str, Any], endpoint: str = GENERATIONS, **kw: Any
) -> APIError:
    with pytest.raises(APIError) as info:
        maker.parse(endpoint, body, **kw)
    return info.value


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("model_id", "size", "quality", "n"),
    [
        ("gpt-image-2", "1024x1024", "low", 1),
        ("gpt-image-2", "1536x1024", "high", 3),
        ("gpt-image-2", "2048x1152", "medium", 1),
        ("gpt-image-1.5", "1024x1536", "medium", 2),
        ("gpt-image-2", "auto", "auto", 1),
    ],
)
def test_usage_is_the_catalog_tables_times_n(maker, model_id, size, quality, n):
    prompt = "A studio photo of a red ceramic mug, product shot"
    req = maker.parse(
        GENERATIONS, {"model": model_id, "prompt": prompt, "size": size, "quality": quality, "n": n}
    )
    model = CATALOG.models[model_id]
    w, h = model.resolve_size(size)
    expected_out = output_image_tokens(model, w, h, model.resolve_quality(quality)) * n
    expected_text = prompt_tokens(prompt, CATALOG.prompt_overhead_tokens)
    assert req.usage() == {
        "input_tokens": expected_text,
        "input_tokens_details": {"text_tokens": expected_text, "image_tokens": 0},
        "output_tokens": expected_out,
        "output_tokens_details": {"image_tokens": expected_out, "text_tokens": 0},
        "total_tokens": expected_text + expected_out,
    }
    images = maker.images(req)
    assert len(images) == n and len(set(images)) == n


def test_edit_bills_each_input_image(maker):
    first = probe_image(png(1024, 1024), "image")
    second = probe_image(png(1536, 1024), "image")
    req = maker.parse(
        EDITS,
        {"model": "gpt-image-1.5", "prompt": "make it blue", "input_fidelity": "high"},
        inputs=(first, second),
    )
    model = CATALOG.models["gpt-image-1.5"]
    assert req.image_tokens == input_image_tokens(model, 1024, 1024, True) + input_image_tokens(
        model, 1536, 1024, True
    )
    # facts §4.2: 1024² is one 512-px tile (194), 1536x1024 two (323), plus the high-fidelity extra.
    assert req.image_tokens == (65 + 129 * 1 + 4160) + (65 + 129 * 2 + 6240)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "512x512"}, "size"),
        ({"size": "1000x1000"}, "size"),
        ({"quality": "hd"}, "quality"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "2"}, "n"),
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"moderation": "none"}, "moderation"),
        ({"response_format": "url"}, "response_format"),
        ({"colour": "red"}, "colour"),
        ({"model": None}, "model"),
    ],
)
def test_refusals_are_400s_naming_the_parameter(maker, body, param):
    full = {"model": "gpt-image-2", "prompt": "a mug", **body}
    if body.get("model", "") is None:
        del full["model"]
    err = refusal(maker, full)
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.param == param
    assert err.message


def test_a_prompt_of_exactly_32000_characters_is_fine(maker):
    assert maker.parse(GENERATIONS, {"model": "gpt-image-2", "prompt": "x" * 32_000}).prompt


def test_unknown_and_shut_down_models_are_not_found(maker):
    unknown = refusal(maker, {"model": "gpt-image-9", "prompt": "a mug"})
    assert (unknown.status, unknown.code, unknown.param) == (404, "model_not_found", "model")
    gone = refusal(maker, {"model": "gpt-image-1", "prompt": "a mug"})
    assert gone.status == 404 and gone.code == "model_not_found"
    assert "2026-10-23" in gone.message and "gpt-image-2" in gone.message


def test_mask_must_match_the_first_image_and_have_alpha(maker):
    image = probe_image(png(1024, 1024), "image")
    wrong_size = probe_image(png(512, 512, "RGBA"), "mask")
    no_alpha = probe_image(png(1024, 1024), "mask")
    body = {"model": "gpt-image-2", "prompt": "edit"}
    assert refusal(maker, body, EDITS, inputs=(image,), mask=wrong_size).param == "mask"
    assert refusal(maker, body, EDITS, inputs=(image,), mask=no_alpha).param == "mask"
    assert refusal(maker, body, EDITS).param == "images"


def test_not_an_image_is_refused():
    with pytest.raises(APIError) as info:
        probe_image(b"GIF89a not really", "image")
    assert info.value.status == 400 and info.value.param == "image"


def test_moderation_blocks_with_details(maker):
    maker.moderate("a calm lake", "req_1")
    with pytest.raises(APIError) as info:
        maker.moderate("Some GORE and a forbidden thing", "req_2")
    err = info.value
    assert (err.status, err.type, err.code) == (
        400,
        "image_generation_user_error",
        "moderation_blocked",
    )
    assert err.body()["error"]["moderation_details"] == {
        "moderation_stage": "input",
        "categories": ["other", "violence"],
    }
    assert "req_2" in err.message
