"""The sync endpoints through the official SDK: images, edits, models, errors, limits, retries."""

from __future__ import annotations

import base64
import io
import math
import time
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image

from service.catalog import cached_catalog
from service.tokens import input_image_tokens, output_image_tokens, prompt_tokens
from tests.simulator.schemas import check
from tests.support.catalog import catalog_without_shutdowns

CATALOG = cached_catalog()


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (10, 120, 200, 255)[: len(mode)]).save(out, "PNG")
    return out.getvalue()


def raw_json(client: openai.OpenAI, path: str, **kw: Any) -> dict[str, Any]:
    resp = httpx2.request(kw.pop("method", "GET"), f"{client.base_url}{path.lstrip('/')}", **kw)
    data: dict[str, Any] = resp.json()
    return data


def test_generate_returns_real_images_usage_and_headers(client, sim):
    raw = client.images.with_raw_response.generate(
        model="gpt-image-2",
        prompt="a red mug",
        size="1536x1024",
        quality="medium",
        n=2,
        output_format="webp",
    )
    assert raw.headers["x-request-id"].startswith("req_")
    for name in ("requests", "tokens"):
        for what in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{what}-{name}" in raw.headers
    body = raw.http_response.json()
    check("ImagesResponse", body)
    result = raw.parse()
    assert [decode(d.b64_json or "").size for d in result.data or []] == [(1536, 1024)] * 2
    assert {decode(d.b64_json or "").format for d in result.data or []} == {"WEBP"}
    assert result.data and result.data[0].b64_json != result.data[1].b64_json
    model = CATALOG.models["gpt-image-2"]
    assert result.usage is not None
    assert result.usage.output_tokens == 2 * output_image_tokens(model, 1536, 1024, "medium")
    assert result.usage.input_tokens_details.text_tokens == prompt_tokens(
        "a red mug", CATALOG.prompt_overhead_tokens
    )
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1536x1024",
        "medium",
        "webp",
        "opaque",
    )


def test_same_request_same_bytes(client):
    kw: dict[str, Any] = {
        "model": "gpt-image-2",
        "prompt": "same thing twice",
        "size": "1024x1024",
        "quality": "low",
    }
    a = client.images.generate(**kw).data
    b = client.images.generate(**kw).data
    assert a and b and a[0].b64_json == b[0].b64_json


def test_transparent_png_has_alpha(client):
    result = client.images.generate(
        model="gpt-image-2",
        prompt="a sticker",
        background="transparent",
        output_format="png",
        quality="low",
    )
    assert result.background == "transparent"
    img = decode((result.data or [])[0].b64_json or "").convert("RGBA")
    assert img.getpixel((0, 0)) == (0, 0, 0, 0)


def test_multipart_edit_with_several_images_and_a_mask(make_sim, tmp_path):
    # gpt-image-1.5 (tile-priced inputs) is shut down in the shipped catalog: run it against a
    # catalog of the test's own, so the test does not depend on today's date.
    sim = make_sim(catalog_file=catalog_without_shutdowns(tmp_path))
    client = sim.client(max_retries=0)
    result = client.images.edit(
        model="gpt-image-1.5",
        image=[
            ("a.png", png_bytes(1024, 1024), "image/png"),
            ("b.png", png_bytes(1536, 1024), "image/png"),
        ],
        mask=("mask.png", png_bytes(1024, 1024, "RGBA"), "image/png"),
        prompt="put the mug on a shelf",
        size="1024x1536",
        quality="low",
    )
    model = CATALOG.models["gpt-image-1.5"]
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == input_image_tokens(
        model, 1024, 1024
    ) + input_image_tokens(model, 1536, 1024)
    assert result.usage.output_tokens == 408
    assert decode((result.data or [])[0].b64_json or "").size == (1024, 1536)


def test_json_edit_with_data_url_and_file_id(client):
    uploaded = client.files.create(file=("ref.png", png_bytes(2048, 1024)), purpose="vision")
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(1024, 1024)).decode()
    body = {
        "model": "gpt-image-2",
        "prompt": "combine these",
        "images": [{"image_url": data_url}, {"file_id": uploaded.id}],
        "quality": "low",
    }
    result = client.post("/images/edits", body=body, cast_to=openai.types.ImagesResponse)
    model = CATALOG.models["gpt-image-2"]
    expected = input_image_tokens(model, 1024, 1024) + input_image_tokens(model, 2048, 1024)
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == expected
    assert decode((result.data or [])[0].b64_json or "").size == (1024, 1024)


def test_json_edit_refuses_urls_it_cannot_fetch(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.post(
            "/images/edits",
            body={
                "model": "gpt-image-2",
                "prompt": "x",
                "images": [{"image_url": "https://example.com/a.png"}],
            },
            cast_to=openai.types.ImagesResponse,
        )
    assert info.value.param == "images[0].image_url"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"size": "512x512"}, "size"),
        ({"quality": "hd"}, "quality"),
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "y" * 32_001}, "prompt"),
    ],
)
def test_bad_parameters_are_400_with_param(client, kw, param):
    args = {"model": "gpt-image-2", "prompt": "a mug", **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**args)
    err = info.value
    assert err.param == param and err.type == "invalid_request_error"
    assert err.request_id and err.request_id.startswith("req_")
    check("ErrorResponse", err.response.json())


def test_moderation_blocked_is_400_with_details(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-2", prompt="a FORBIDDEN picture")
    err = info.value
    assert (err.code, err.type) == ("moderation_blocked", "image_generation_user_error")
    body = err.response.json()
    check("ErrorResponse", body)
    assert body["error"]["moderation_details"]["categories"] == ["other"]


def test_models_list_and_shut_down_model(client):
    listed = raw_json(client, "/models")
    check("ListModelsResponse", listed)
    ids = [m.id for m in client.models.list()]
    assert ids == list(CATALOG.models)
    gone = client.models.retrieve("gpt-image-1")
    check("Model", gone.model_dump())
    assert gone.shutdown_date == "2026-10-23"
    assert client.models.retrieve("gpt-image-2").shutdown_date is None
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="gpt-image-1", prompt="a mug")
    assert info.value.code == "model_not_found" and "gpt-image-2" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-42")


def test_unknown_route_is_an_openai_404(client):
    resp = httpx2.get(f"{client.base_url}nothing/here")
    assert resp.status_code == 404
    check("ErrorResponse", resp.json())
    assert resp.headers["x-request-id"].startswith("req_")


def test_rate_limit_429_with_headers_and_the_sdk_retries(make_sim):
    # A bucket of 60 refilled one request every 3 s. A loaded machine may refill one or two while
    # the test spends the 60, so it spends until refused with a wait of a second or more (a
    # shorter one is waited out), so that the SDK's request just after is refused too.
    sim = make_sim(rpm=20, limit_window=180)
    strict = sim.client(max_retries=0)
    kw: dict[str, Any] = {"model": "gpt-image-2", "prompt": "tiny", "quality": "low"}
    made = 0
    for _ in range(90):
        try:
            strict.images.generate(**kw)
            made += 1
        except openai.RateLimitError as exc:
            err = exc
            wait_ms = int(exc.response.headers["retry-after-ms"])
            if wait_ms >= 1000:
                break
            time.sleep(wait_ms / 1000)
    assert 60 <= made < 90
    headers = err.response.headers
    assert err.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) == math.ceil(wait_ms / 1000) <= 3
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    check("ErrorResponse", err.response.json())
    # The SDK waits the retry-after and gets through.
    raw = sim.client(max_retries=2).images.with_raw_response.generate(**kw)
    assert raw.retries_taken >= 1
    assert raw.parse().data
    stats = sim.stats()
    assert stats["models"]["gpt-image-2"]["rate_limited"] >= 2
    assert stats["sync"]["images"] == made + 1


def test_injected_500_and_the_sdk_retries(make_sim):
    sim = make_sim(fail_rate=0.5)
    strict = sim.client(max_retries=0)
    strict.images.generate(model="gpt-image-2", prompt="first passes", quality="low")
    with pytest.raises(openai.InternalServerError) as info:
        strict.images.generate(model="gpt-image-2", prompt="second fails", quality="low")
    assert info.value.status_code == 500
    assert info.value.type == "server_error"
    check("ErrorResponse", info.value.response.json())
    patient = sim.client(max_retries=2)
    raw = patient.images.with_raw_response.generate(
        model="gpt-image-2", prompt="third passes", quality="low"
    )
    raw = patient.images.with_raw_response.generate(
        model="gpt-image-2", prompt="fourth retried", quality="low"
    )
    assert raw.retries_taken == 1 and raw.parse().data
    stats = sim.stats()["models"]["gpt-image-2"]
    assert stats["server_errors_injected"] == 2
    assert stats["images"] == 3


def test_api_key_required_when_set(make_sim):
    sim = make_sim(api_key="sk-right-key-1234")
    assert sim.client().models.list().data
    with pytest.raises(openai.AuthenticationError) as info:
        sim.client(api_key="sk-wrong-key-9999").models.list()
    assert info.value.code == "invalid_api_key"
    assert "9999" in info.value.message and "wrong" not in info.value.message
    resp = httpx2.get(f"{sim.url}/models")
    assert resp.status_code == 401
    check("ErrorResponse", resp.json())
    # The admin view needs no key.
    assert "sync" in sim.stats()


def test_latency_is_added_to_sync_requests(make_sim):
    sim = make_sim(latency_ms=300)
    client = sim.client(max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="gpt-image-2", prompt="slow", quality="low"
    )
    assert raw.elapsed.total_seconds() >= 0.3


def _ratelimit_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-ratelimit-")}


def test_limit_window_bucket_full_at_start_shared_and_headers_on_every_answer(make_sim):
    # 60 requests a minute in a 30-second window: a full bucket holds 30, refilled 1 a second.
    sim = make_sim(rpm=60, limit_window=30, fail_rate=0.5, latency_ms=0)
    ours, theirs = sim.client(max_retries=0), sim.client(max_retries=0)
    kw: dict[str, Any] = {"prompt": "tiny", "quality": "low"}
    raw = ours.images.with_raw_response.generate(model="gpt-image-2", **kw)
    assert raw.headers["x-ratelimit-limit-requests"] == "30"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) == 29  # it started full
    # Another client of the organization (another model) spends the rest of the same bucket;
    # fail_rate 0.5 answers every second request it runs with a 500.
    seen: dict[int, dict[str, str]] = {}
    for _ in range(40):
        try:
            got = theirs.images.with_raw_response.generate(model="gpt-image-2-2026-04-21", **kw)
            seen.setdefault(200, _ratelimit_headers(got.headers))
        except openai.APIStatusError as exc:
            seen.setdefault(exc.status_code, _ratelimit_headers(exc.response.headers))
            if exc.status_code == 429:
                assert float(exc.response.headers["retry-after-ms"]) <= 1000
                assert exc.response.headers["retry-after"] == "1"
                break
    with pytest.raises(openai.BadRequestError) as bad:
        ours.images.generate(model="gpt-image-2", prompt="tiny", size="17x17")
    seen[400] = _ratelimit_headers(bad.value.response.headers)
    assert set(seen) == {200, 400, 429, 500}
    for status, headers in seen.items():
        assert {
            f"x-ratelimit-{w}-{k}"
            for w in ("limit", "remaining", "reset")
            for k in ("requests", "tokens")
        } <= set(headers), status
    assert seen[429]["x-ratelimit-remaining-requests"] == "0"
    # Refills over the window: from empty, a full bucket again in at most 30 s.
    assert 29.0 <= parse_reset(seen[429]["x-ratelimit-reset-requests"]) <= 30.0
    stats = sim.stats()["models"]
    assert stats["gpt-image-2-2026-04-21"]["rate_limited"] == 1
    assert stats["gpt-image-2"]["rate_limited"] == 0
    # A reset fills the bucket again (a benchmark's next case starts fresh).
    sim.reset()
    try:
        after = ours.images.with_raw_response.generate(model="gpt-image-2", **kw).headers
    except openai.InternalServerError as exc:  # every second request still fails
        after = exc.response.headers
    assert after["x-ratelimit-remaining-requests"] == "29"


def parse_reset(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))
