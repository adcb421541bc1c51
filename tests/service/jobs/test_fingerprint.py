"""Fingerprints: what changes an item's image changes its fingerprint, and nothing else does."""

from __future__ import annotations

import base64

import pytest

from service.catalog import EDITS, GENERATIONS, cached_catalog
from service.jobs import fingerprint as fp

BODY = {"model": "gpt-image-2", "prompt": "A red mug", "size": "1024x1024", "quality": "low"}


def print_of(
    body: dict, endpoint: str = GENERATIONS, snapshot: str = "gpt-image-2-2026-04-21", **kw
) -> str:
    return fp.fingerprint(endpoint, body, snapshot, **kw)


def test_the_alias_resolves_to_its_dated_snapshot() -> None:
    catalog = cached_catalog()
    assert fp.snapshot(catalog, "gpt-image-2") == "gpt-image-2-2026-04-21"
    assert fp.snapshot(catalog, "gpt-image-2-2026-04-21") == "gpt-image-2-2026-04-21"
    assert fp.snapshot(catalog, "gpt-image-2.6-flare") == "gpt-image-2.6-flare"  # no snapshot


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "A blue mug"),
        ("size", "1536x1024"),
        ("quality", "medium"),
        ("output_format", "webp"),
        ("background", "transparent"),
        ("moderation", "low"),
        ("input_fidelity", "high"),
        ("n", 2),
        ("some_future_field", "x"),
    ],
)
def test_every_output_field_changes_it(field: str, value: object) -> None:
    assert print_of({**BODY, field: value}) != print_of(BODY)


def test_model_snapshot_endpoint_and_references_change_it() -> None:
    assert print_of(BODY, snapshot="gpt-image-2-2027-01-01") != print_of(BODY)
    assert print_of(BODY, endpoint=EDITS) != print_of(BODY)
    a, b = fp.digest(b"photo a"), fp.digest(b"photo b")
    assert print_of(BODY, image_ids=[a]) != print_of(BODY, image_ids=[b])
    assert print_of(BODY, image_ids=[a, b]) != print_of(BODY, image_ids=[b, a])
    assert print_of(BODY, image_ids=[a], mask_id=b) != print_of(BODY, image_ids=[a])


def test_defaults_spelled_out_and_what_does_not_change_the_image_do_not() -> None:
    assert print_of({**BODY, "output_format": "png", "n": 1, "background": "auto"}) == print_of(
        BODY
    )
    assert print_of({**BODY, "model": "another-alias", "user": "u-1"}) == print_of(BODY)
    jpeg = {**BODY, "output_format": "jpeg"}
    assert print_of({**jpeg, "output_compression": 100}) == print_of(jpeg)
    assert print_of({**jpeg, "output_compression": 80}) != print_of(jpeg)


def test_references_count_by_content_not_by_name() -> None:
    photo = base64.b64encode(b"the same bytes").decode()
    same = {**BODY, "images": [f"data:image/png;base64,{photo}"]}
    other_name = {**BODY, "images": [f"data:image/jpeg;base64,{photo}"]}
    assert fp.without_reading(EDITS, same, "s") == fp.without_reading(EDITS, other_name, "s")
    assert fp.ref_identity(f"data:image/png;base64,{photo}") == fp.digest(b"the same bytes")
    assert fp.ref_identity("file-abc123") == "file:file-abc123"
    # Stored references must be read; https ones are not fetched: no fingerprint without reading.
    assert fp.without_reading(EDITS, {**BODY, "images": ["s3://b/k.png"]}, "s") is None
    assert fp.without_reading(EDITS, {**BODY, "images": ["https://x/y.png"]}, "s") is None
    assert fp.readable("s3://b/k.png") and fp.readable("file:///a.png")
    assert not fp.readable("https://x/y.png")
