"""Job intake: what a caller sends, what the pipeline gets, and what every rejection says."""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.catalog import EDITS, GENERATIONS, Catalog, cached_catalog, load_catalog
from service.errors import (
    MAX_FIELD_ERRORS,
    PROBLEM_CONTENT_TYPE,
    FieldError,
    Problem,
    body_too_large,
    conflict,
    not_found,
    unauthorized,
    unsupported_media_type,
    validation_problem,
)
from service.jobs.spec import ItemSpec, JobSpec, parse_job_csv, parse_job_json

CAT = cached_catalog()
TODAY = dt.date(2026, 11, 21)


def dumps(doc: Any) -> bytes:
    # The stdlib encoder also writes what orjson refuses to (ints over 64 bits, deep nesting).
    return json.dumps(doc, ensure_ascii=False).encode()


def parse(doc: dict[str, Any] | bytes, max_items: int = 1000, **kw: Any) -> JobSpec:
    body = doc if isinstance(doc, bytes) else dumps(doc)
    catalog = kw.pop("catalog", CAT)
    return parse_job_json(body, catalog, max_items=max_items, today=kw.pop("today", TODAY))


def reject(doc: dict[str, Any] | bytes, status: int = 422, **kw: Any) -> Problem:
    with pytest.raises(Problem) as caught:
        parse(doc, **kw)
    assert caught.value.status == status, caught.value.to_dict()
    return caught.value


def error(problem: Problem, field: str) -> FieldError:
    found = [e for e in problem.errors if e.field == field]
    assert found, f"no error for {field}: {problem.to_dict()}"
    return found[0]


def job(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"items": [{"id": "sku-1", "prompt": "a red mug"}]}
    doc.update(fields)
    return doc


def item_job(**item_fields: Any) -> dict[str, Any]:
    """A job of three items where item 1 (id 'sku-b') carries ``item_fields``."""
    items = [
        {"id": "sku-a", "prompt": "a red mug"},
        {"id": "sku-b", "prompt": "a blue mug", **item_fields},
        {"id": "sku-c", "prompt": "a green mug"},
    ]
    return {"items": items}


def item_error(field: str, status: int = 422, **item_fields: Any) -> FieldError:
    """Reject an item_job and check the error names items[1], its index and its id."""
    problem = reject(item_job(**item_fields), status)
    err = error(problem, f"items[1].{field}")
    assert (err.index, err.id) == (1, "sku-b")
    assert problem.detail.startswith(f"items[1].{field} (item 1, id 'sku-b'): ")
    return err


# ------------------------------------------------------------------------------------------
# What intake produces


def test_product_example_job_becomes_upstream_bodies() -> None:
    spec = parse(
        {
            "model": "gpt-image-2",
            "mode": "batch",
            "defaults": {"size": "1024x1024", "quality": "low", "output_format": "png", "n": 1},
            "items": [
                {
                    "id": "sku-1001",
                    "prompt": "Studio photo of a red ceramic mug",
                    "quality": "medium",
                },
                {"id": "sku-1002", "prompt": "The same mug", "images": ["s3://catalog/1002.jpg"]},
            ],
            "labels": {"campaign": "spring-sale", "team": "catalog"},
            "max_cost_usd": 25.0,
            "webhook_url": "https://hooks.example.internal/imagebatch",
        }
    )
    assert (spec.model, spec.mode, spec.max_cost_usd) == ("gpt-image-2", "batch", 25.0)
    assert spec.labels == {"campaign": "spring-sale", "team": "catalog"}
    assert spec.webhook_url == "https://hooks.example.internal/imagebatch"
    first, second = spec.items
    assert first == ItemSpec(
        0,
        "sku-1001",
        GENERATIONS,
        {
            "model": "gpt-image-2",
            "prompt": "Studio photo of a red ceramic mug",
            "size": "1024x1024",
            "quality": "medium",
            "output_format": "png",
            "n": 1,
        },
    )
    assert second.endpoint == EDITS and second.is_edit
    assert second.body["images"] == ["s3://catalog/1002.jpg"]
    assert second.body["quality"] == "low"  # the default, not item 0's override
    assert (second.n, second.size, second.quality, second.output_format) == (
        1,
        "1024x1024",
        "low",
        "png",
    )


def test_defaults_and_only_set_keys() -> None:
    spec = parse({"items": [{"prompt": "x"}, {"prompt": "y", "n": 3, "background": "opaque"}]})
    assert spec.model == CAT.default_model and spec.mode == "batch"
    assert spec.labels == {} and spec.max_cost_usd is None and spec.webhook_url is None
    assert spec.items[0].body == {"model": CAT.default_model, "prompt": "x"}
    assert spec.items[1].body == {
        "model": CAT.default_model,
        "prompt": "y",
        "n": 3,
        "background": "opaque",
    }
    assert [i.id for i in spec.items] == ["0", "1"]
    assert spec.items[0].output_format == "png" and spec.items[0].n == 1


def test_null_means_not_given_and_integer_ids() -> None:
    spec = parse(
        {
            "model": None,
            "labels": None,
            "defaults": {"quality": "high"},
            "items": [{"id": 1001, "prompt": "x", "quality": None}],
        }
    )
    assert spec.items[0].id == "1001"
    assert spec.items[0].body["quality"] == "high"


def test_all_override_fields_and_edit_with_mask() -> None:
    spec = parse(
        {
            "defaults": {"output_format": "webp"},
            "items": [
                {
                    "id": "a.b_c-1",
                    "prompt": "x",
                    "size": "2048x1152",
                    "quality": "high",
                    "output_format": "jpeg",
                    "n": 10,
                    "background": "opaque",
                    "output_compression": 80,
                    "moderation": "low",
                    "images": [
                        "s3://bucket/dir/key.png",
                        "https://cdn.example.com/a.jpg?sig=1",
                        "data:image/png;base64,iVBORw0KGgo=",
                        "file-AbC123",
                        "file:///srv/images/a.png",
                    ],
                    "mask": "s3://bucket/mask.png",
                }
            ],
        }
    )
    body = spec.items[0].body
    assert spec.items[0].endpoint == EDITS
    assert (
        body["output_format"] == "jpeg"
        and body["n"] == 10
        and body["mask"] == "s3://bucket/mask.png"
    )
    assert len(body["images"]) == 5


def test_sync_and_auto_modes_and_lane() -> None:
    flare = parse(job(model="gpt-image-2.5-flare", mode="sync"))
    assert flare.mode == "sync" and flare.lane(CAT, 20) == "sync"
    auto = parse(job(model="gpt-image-2.5-flare", mode="auto"))
    assert auto.lane(CAT, 0) == "sync"  # no batch support: auto never picks batch for it
    big = parse({"mode": "auto", "items": [{"prompt": "x"}] * 30})
    assert big.lane(CAT, 20) == "batch" and big.lane(CAT, 30) == "sync"
    assert parse(job()).lane(CAT, 10**6) == "batch"


def test_item_round_trips_through_request_jsonl() -> None:
    spec = parse(job(defaults={"n": 2}))
    line = orjson.loads(orjson.dumps(spec.items[0].to_dict()))
    assert ItemSpec.from_dict(line) == spec.items[0]


def test_template_rows() -> None:
    spec = parse(
        {
            "template": "Studio photo of a {color} {title} {{size {size}}}",
            "rows": [
                {"id": "sku-1", "color": "red", "title": "mug", "size": "XL", "price": [1]},
                {"color": "blue", "title": "cup", "size": 2, "images": ["s3://b/2.jpg"]},
                {"id": 77, "color": "green", "title": "bowl", "size": 1.5},
            ],
            "defaults": {"size": "1536x1024"},
        }
    )
    prompts = [i.prompt for i in spec.items]
    assert prompts == [
        "Studio photo of a red mug {size XL}",
        "Studio photo of a blue cup {size 2}",
        "Studio photo of a green bowl {size 1.5}",
    ]
    assert [i.id for i in spec.items] == ["sku-1", "1", "77"]
    # A "size" column is template data: the image size is still the job's default.
    assert all(i.size == "1536x1024" for i in spec.items)
    assert spec.items[1].endpoint == EDITS and spec.items[0].endpoint == GENERATIONS


def test_upcoming_shutdown_is_a_warning_and_then_a_refusal() -> None:
    spec = parse(job(model="gpt-image-1.5"))
    assert spec.warnings and "2026-12-01" in spec.warnings[0]
    problem = reject(job(model="gpt-image-1.5"), today=dt.date(2026, 12, 1))
    assert "shut down" in error(problem, "model").message


# ------------------------------------------------------------------------------------------
# Job-level rejections


def test_unknown_model_lists_known_ones() -> None:
    problem = reject(job(model="gpt-image-3"))
    message = error(problem, "model").message
    assert "unknown model 'gpt-image-3'" in message and "gpt-image-2" in message
    assert "gpt-image-1," not in message  # shut-down models are not suggested
    assert problem.detail.startswith("model: unknown model")
    assert "did you mean 'gpt-image-2'" in reject(job(model="gpt-image2")).detail


def test_shut_down_model_names_its_replacements() -> None:
    problem = reject(job(model="gpt-image-1"))
    message = error(problem, "model").message
    assert "shut down on 2026-10-23" in message
    assert "'gpt-image-2'" in message and "'gpt-image-2.5-sunburst'" in message


def test_batch_mode_needs_batch_support() -> None:
    problem = reject(job(model="gpt-image-2.5-flare"))
    message = error(problem, "model").message
    assert "does not support the Batch API" in message and "'sync'" in message


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"mode": "fast"}, "mode", "mode must be one of batch, sync, auto"),
        ({"mode": 1}, "mode", "mode must be one of"),
        ({"model": 5}, "model", "model must be a string"),
        ({"labels": ["a"]}, "labels", "labels must be an object"),
        ({"labels": {f"k{i}": "v" for i in range(17)}}, "labels", "at most 16 labels"),
        ({"labels": {"Campaign": "x"}}, "labels.Campaign", "[a-z0-9_.-]{1,63}"),
        ({"labels": {"k" * 64: "x"}}, "labels." + "k" * 64, "[a-z0-9_.-]{1,63}"),
        ({"labels": {"team": 5}}, "labels.team", "must be a string"),
        ({"labels": {"team": "x" * 257}}, "labels.team", "at most 256 characters"),
        ({"max_cost_usd": 0}, "max_cost_usd", "more than 0"),
        ({"max_cost_usd": -3.5}, "max_cost_usd", "more than 0"),
        ({"max_cost_usd": 1e10}, "max_cost_usd", "at most 1,000,000,000"),
        ({"max_cost_usd": 10**30}, "max_cost_usd", "at most"),
        ({"max_cost_usd": "25"}, "max_cost_usd", "must be a number"),
        ({"max_cost_usd": True}, "max_cost_usd", "must be a number"),
        ({"webhook_url": "ftp://example.com/x"}, "webhook_url", "http:// or https://"),
        ({"webhook_url": "hooks.example.com"}, "webhook_url", "http:// or https://"),
        ({"webhook_url": "https://"}, "webhook_url", "no host"),
        ({"webhook_url": "https://a b.com/"}, "webhook_url", "spaces"),
        ({"webhook_url": "https://[::1/x"}, "webhook_url", "malformed"),
        ({"webhook_url": "https://h.com:99999/"}, "webhook_url", "malformed"),
        ({"webhook_url": "https://h.com/" + "x" * 3000}, "webhook_url", "at most 2,048"),
        ({"webhook_url": 7}, "webhook_url", "must be a string"),
        ({"defaults": []}, "defaults", "defaults must be an object"),
        ({"defaults": {"prompt": "x"}}, "defaults.prompt", "set per item"),
        ({"defaults": {"qualty": "low"}}, "defaults.qualty", "did you mean 'quality'"),
        ({"defaults": {"size": "256x256"}}, "defaults.size", "total pixels"),
        ({"defaults": {"n": 0}}, "defaults.n", "from 1 to 10"),
        ({"itemz": []}, "itemz", "did you mean 'items'"),
        ({"webhook": "https://x"}, "webhook", "did you mean 'webhook_url'"),
    ],
)
def test_job_field_rejections(fields: dict[str, Any], field: str, fragment: str) -> None:
    problem = reject(job(**fields))
    err = error(problem, field)
    assert fragment in err.message, err.message
    assert err.index is None and err.id is None
    assert problem.type == "https://imagebatch.dev/problems/validation"


def test_valid_job_fields_are_kept() -> None:
    spec = parse(
        job(
            labels={"campaign": "spring-sale", "team.a_b-1": "x" * 256},
            max_cost_usd=1e9,
            webhook_url="http://hooks.internal:8080/x?y=1",
        )
    )
    assert spec.max_cost_usd == 1e9 and spec.labels["team.a_b-1"] == "x" * 256


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [
        ({}, "items", "no items"),
        ({"items": []}, "items", "no items"),
        ({"items": {"prompt": "x"}}, "items", "must be an array"),
        ({"items": [{"prompt": "x"}], "template": "{a}", "rows": [{"a": 1}]}, "items", "not both"),
        ({"template": "{a}"}, "rows", "rows are required"),
        ({"rows": [{"a": "x"}]}, "template", "template is required"),
        ({"template": 5, "rows": [{"a": "x"}]}, "template", "must be a string"),
        ({"template": "{a", "rows": [{"a": "x"}]}, "template", "unmatched '{' at position 0"),
        ({"template": "a}", "rows": [{"a": "x"}]}, "template", "unmatched '}'"),
        ({"template": "a {}", "rows": [{"a": "x"}]}, "template", "empty placeholder"),
        ({"template": "{a}", "rows": []}, "rows", "no items"),
    ],
)
def test_job_shape_rejections(doc: dict[str, Any], field: str, fragment: str) -> None:
    assert fragment in error(reject(doc), field).message


def test_too_many_items_is_refused_without_reading_them() -> None:
    problem = reject({"items": [{"prompt": "x"}] * 11}, max_items=10)
    assert "11 items" in problem.detail and "at most 10" in problem.detail
    problem = reject({"template": "{a}", "rows": [{"a": "x"}] * 11}, max_items=10)
    assert error(problem, "rows")


def test_malformed_json_is_a_400_with_the_position() -> None:
    problem = reject(b'{"items": [{"prompt": "x"},]}', status=400)
    assert problem.type == "https://imagebatch.dev/problems/malformed-body"
    assert "not valid JSON" in problem.detail and "line 1 column 27 (byte 26)" in problem.detail
    assert problem.to_dict()["line"] == 1 and problem.to_dict()["position"] == 26
    assert reject(b"", status=400)
    assert "UTF-8" in reject(b'{"items": "\xff"}', status=400).detail


@pytest.mark.parametrize("body", [b"[]", b"null", b'"job"', b"42", b"true"])
def test_non_object_body(body: bytes) -> None:
    problem = reject(body)
    assert problem.detail.startswith("The body must be a JSON object")
    assert problem.errors[0].field == ""


# ------------------------------------------------------------------------------------------
# Item rejections: every one names items[i].field, the index and the id


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"size": "1000x1000"}, "size", "multiples of 16"),
        ({"size": "4096x2048"}, "size", "at most 3840"),
        ({"size": "3840x1024"}, "size", "between 1:3 and 3:1"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "9" * 100}, "size", "WIDTHxHEIGHT"),
        ({"size": 1024}, "size", "must be a string"),
        ({"quality": "ultra"}, "quality", "use one of auto, low, medium, high"),
        ({"quality": "xhigh"}, "quality", "not offered by gpt-image-2"),
        ({"output_format": "gif"}, "output_format", "use one of png, jpeg, webp"),
        ({"n": 0}, "n", "from 1 to 10"),
        ({"n": 11}, "n", "from 1 to 10"),
        ({"n": "two"}, "n", "whole number"),
        ({"n": True}, "n", "whole number"),
        ({"n": 1.0}, "n", "whole number"),
        ({"n": 2**70}, "n", "whole number"),
        ({"background": "clear"}, "background", "auto, opaque, transparent"),
        ({"background": "transparent", "output_format": "jpeg"}, "background", "png or webp"),
        ({"output_compression": 101}, "output_compression", "from 0 to 100"),
        ({"output_compression": -1}, "output_compression", "from 0 to 100"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp only"),
        ({"output_compression": 50, "output_format": "png"}, "output_compression", "not 'png'"),
        ({"moderation": "none"}, "moderation", "auto, low"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": " \n\t"}, "prompt", "prompt is empty"),
        ({"prompt": None}, "prompt", "prompt is required"),
        ({"prompt": ["x"]}, "prompt", "must be a string"),
        ({"prompt": "x" * 32_001}, "prompt", "32,001 characters; the most is 32,000"),
        ({"promt": "x"}, "promt", "did you mean 'prompt'"),
        ({"model": "gpt-image-2"}, "model", "whole job"),
        ({"images": []}, "images", "1 to 16"),
        ({"images": ["s3://b/k"] * 17}, "images", "1 to 16"),
        ({"images": "s3://b/k"}, "images", "must be an array"),
        ({"images": [5]}, "images[0]", "must be a string"),
        ({"images": ["s3://b/k", "ftp://x/y"]}, "images[1]", "is not an image reference"),
        ({"images": ["s3://bucket"]}, "images[0]", "s3://bucket/key"),
        ({"images": ["s3:///key"]}, "images[0]", "s3://bucket/key"),
        ({"images": ["http://example.com/a.png"]}, "images[0]", "is not an image reference"),
        ({"images": ["https://"]}, "images[0]", "no host"),
        ({"images": ["data:text/plain;base64,aGk="]}, "images[0]", "data:image/"),
        ({"images": ["data:image/png,raw"]}, "images[0]", "data:image/"),
        ({"images": ["file-"]}, "images[0]", "file-abc123"),
        ({"images": ["file-a/b"]}, "images[0]", "file-abc123"),
        ({"images": ["file:///"]}, "images[0]", "absolute/path"),
        ({"mask": "s3://b/m.png"}, "mask", "needs images"),
        ({"images": ["s3://b/k"], "mask": "nope"}, "mask", "is not an image reference"),
        ({"images": ["s3://b/k"], "mask": ["s3://b/m"]}, "mask", "must be a string"),
    ],
)
def test_item_rejections(fields: dict[str, Any], field: str, fragment: str) -> None:
    err = item_error(field, **fields)
    assert fragment in err.message, err.message


def test_prompt_of_exactly_32000_characters_is_accepted() -> None:
    assert parse(item_job(prompt="x" * 32_000)).items[1].prompt == "x" * 32_000


def test_conflict_in_defaults_is_reported_once_not_per_item() -> None:
    problem = reject(
        {
            "defaults": {"background": "transparent", "output_format": "jpeg"},
            "items": [{"prompt": "x"}] * 5,
        }
    )
    assert [e.field for e in problem.errors] == ["defaults.background"]


def test_item_override_conflicting_with_a_default_blames_the_override() -> None:
    doc = item_job(output_format="jpeg")
    doc["defaults"] = {"background": "transparent"}
    err = error(reject(doc), "items[1].output_format")
    assert "transparent background needs output_format png or webp" in err.message
    doc = item_job(output_format="png")
    doc["defaults"] = {"output_format": "jpeg", "output_compression": 70}
    err = error(reject(doc), "items[1].output_format")
    assert "output_compression applies to jpeg and webp only" in err.message
    # Inheriting a consistent default is fine.
    doc = item_job(background="transparent")
    doc["defaults"] = {"output_format": "webp", "output_compression": 70}
    assert parse(doc).items[1].body["background"] == "transparent"


def test_item_that_is_not_an_object() -> None:
    problem = reject({"items": [{"prompt": "x"}, "a prompt"]})
    err = error(problem, "items[1]")
    assert err.index == 1 and "must be an object" in err.message


@pytest.mark.parametrize("bad_id", ["a b", "", "x" * 129, "sku/1", "ü", -1, 1.5, True, ["a"]])
def test_malformed_ids(bad_id: Any) -> None:
    problem = reject(item_job(id=bad_id))
    err = error(problem, "items[1].id")
    assert err.index == 1
    assert "1 to 128 characters" in err.message or "must be a string" in err.message


def test_id_of_128_characters_is_accepted() -> None:
    assert parse(item_job(id="A" * 128)).items[1].id == "A" * 128


def test_duplicate_ids_name_both_indexes() -> None:
    doc = {
        "items": [
            {"id": "a", "prompt": "x"},
            {"id": "b", "prompt": "x"},
            {"id": "a", "prompt": "y"},
        ]
    }
    problem = reject(doc)
    err = error(problem, "items[2].id")
    assert (err.index, err.id) == (2, "a")
    assert "id 'a' is already used by items[0]" in err.message
    assert problem.detail.startswith(
        "items[2].id (item 2, id 'a'): id 'a' is already used by items[0]"
    )


def test_an_explicit_id_colliding_with_an_index_id() -> None:
    problem = reject({"items": [{"id": "1", "prompt": "x"}, {"prompt": "y"}]})
    err = error(problem, "items[1].id")
    assert "no id, so its id is its index '1'" in err.message and "items[0]" in err.message


def test_template_placeholder_without_a_value_names_the_row() -> None:
    problem = reject(
        {
            "template": "a {color} {title}",
            "rows": [{"id": "r0", "color": "red", "title": "mug"}, {"id": "r1", "title": "cup"}],
        }
    )
    err = error(problem, "rows[1]")
    assert (err.index, err.id) == (1, "r1")
    assert "row 1 has no value for template placeholder {color}" in err.message


def test_template_value_of_the_wrong_type() -> None:
    problem = reject({"template": "a {color}", "rows": [{"color": {"r": 1}}]})
    assert "must be a string or number" in error(problem, "rows[0].color").message
    problem = reject({"template": "a {color}", "rows": [{"color": "red"}, []]})
    assert "a row must be an object" in error(problem, "rows[1]").message


def test_duplicate_row_ids() -> None:
    problem = reject({"template": "{t}", "rows": [{"id": "a", "t": "x"}, {"id": "a", "t": "y"}]})
    assert "already used by rows[0]" in error(problem, "rows[1].id").message


def test_rendered_prompt_over_the_limit() -> None:
    problem = reject({"template": "{t}{t}", "rows": [{"t": "x" * 16_001}]})
    assert "the most is 32,000" in error(problem, "rows[0].prompt").message


def test_models_without_edits_or_transparency(tmp_path: Path) -> None:
    catalog = _small_catalog(tmp_path)
    problem = reject(item_job(images=["s3://b/k"]), catalog=catalog)
    assert "does not offer edits" in error(problem, "items[1].images").message
    problem = reject(item_job(background="transparent"), catalog=catalog)
    assert "cannot make transparent backgrounds" in error(problem, "items[1].background").message


def _small_catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(
        """
default_model = "gen-only"
batch_discount = 0.5
prompt_overhead_tokens = 6

[models."gen-only"]
created = 1
batch = true
endpoints = ["/v1/images/generations"]
sizes = ["auto", "1024x1024"]
qualities = ["auto", "low"]
formats = ["png", "jpeg"]
transparent_background = false
output_tokens = "gpt-image-2"
input_images = "patches"
price = { text_input = 5.0, image_input = 8.0, image_output = 30.0 }
"""
    )
    return load_catalog(path)


def test_many_bad_items_answer_small() -> None:
    items = [{"id": f"s{i}", "prompt": "", "n": 0} for i in range(50_000)]
    problem = reject({"items": items}, max_items=50_000)
    body = problem.to_dict()
    assert len(body["errors"]) == MAX_FIELD_ERRORS
    assert body["errors_omitted"] == 100_000 - MAX_FIELD_ERRORS
    assert problem.detail.startswith("items[0].n (item 0, id 's0'): n must be from 1 to 10")
    assert "99,999 more problems" in problem.detail
    assert len(orjson.dumps(body)) < 20_000


# ------------------------------------------------------------------------------------------
# CSV catalogs


def parse_csv(text: str | bytes, max_items: int = 1000, **params: str) -> JobSpec:
    body = text.encode() if isinstance(text, str) else text
    return parse_job_csv(body, params, CAT, max_items=max_items, today=TODAY)


def reject_csv(text: str | bytes, status: int = 422, **params: str) -> Problem:
    with pytest.raises(Problem) as caught:
        parse_csv(text, **params)
    assert caught.value.status == status, caught.value.to_dict()
    return caught.value


def test_csv_with_bom_quotes_and_a_sku_column() -> None:
    text = (
        "\ufeffsku,title,color,notes\r\n"
        '1001,"Mug, large",red,"said ""hi"""\r\n'
        '1002,"Cup\nwith a line break",blue,\r\n'
        "\r\n"
        "1003,Bowl,green,\r\n"
    )
    spec = parse_csv(
        text,
        template="Studio photo of a {color} {title}",
        size="1024x1536",
        quality="low",
        n="2",
        output_format="webp",
        output_compression="80",
        background="transparent",
        moderation="low",
        model="gpt-image-2",
        mode="auto",
        max_cost_usd="12.5",
        webhook_url="https://hooks.example/x",
        labels='{"team": "catalog"}',
        **{"label.campaign": "spring"},
    )
    assert [i.id for i in spec.items] == ["1001", "1002", "1003"]
    assert spec.items[0].prompt == "Studio photo of a red Mug, large"
    assert spec.items[1].prompt == "Studio photo of a blue Cup\nwith a line break"
    assert spec.items[0].body == {
        "model": "gpt-image-2",
        "prompt": "Studio photo of a red Mug, large",
        "size": "1024x1536",
        "quality": "low",
        "n": 2,
        "output_format": "webp",
        "output_compression": 80,
        "background": "transparent",
        "moderation": "low",
    }
    assert spec.mode == "auto" and spec.max_cost_usd == 12.5
    assert spec.labels == {"team": "catalog", "campaign": "spring"}
    assert spec.webhook_url == "https://hooks.example/x"


def test_csv_id_column_choice_edits_and_prompt_column() -> None:
    text = "id,sku,prompt,images,mask\na,s1,red mug,,\nb,s2,blue mug,s3://b/2.jpg,s3://b/m.png\n"
    spec = parse_csv(text)
    assert [i.id for i in spec.items] == ["a", "b"]
    assert spec.items[0].endpoint == GENERATIONS and spec.items[0].prompt == "red mug"
    assert spec.items[1].body["images"] == ["s3://b/2.jpg"]
    assert spec.items[1].body["mask"] == "s3://b/m.png"
    assert [i.id for i in parse_csv(text, id_column="sku").items] == ["s1", "s2"]
    text = 'title,refs\nmug,"[""s3://b/1.jpg"", ""https://x.com/2.png""]"\n'
    spec = parse_csv(text, template="a {title}", images_column="refs", delimiter=",")
    assert spec.items[0].body["images"] == ["s3://b/1.jpg", "https://x.com/2.png"]
    assert spec.items[0].id == "0"


def test_csv_semicolon_delimiter_and_tab() -> None:
    assert (
        parse_csv("sku;title\n1;mug\n", template="{title}", delimiter=";").items[0].prompt == "mug"
    )
    assert parse_csv("sku\ttitle\n1\tmug\n", template="{title}", delimiter="tab").items[0].id == "1"


@pytest.mark.parametrize(
    ("text", "params", "field", "fragment"),
    [
        ("sku,title\n1,mug\n", {"template": "a {colour}"}, "template", "{colour} is not a column"),
        ("sku,title\n1,mug\n", {}, "template", "needs ?template="),
        ("sku,title\n1,mug\n", {"template": "{title}", "n": "two"}, "n", "whole number"),
        ("sku,title\n1,mug\n", {"template": "{title}", "n": "11"}, "n", "from 1 to 10"),
        ("sku,title\n1,mug\n", {"template": "{title}", "size": "1x1"}, "size", "WIDTHxHEIGHT"),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "max_cost_usd": "lots"},
            "max_cost_usd",
            "number",
        ),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "max_cost_usd": "nan"},
            "max_cost_usd",
            "must be a number like 25",
        ),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "max_cost_usd": "0"},
            "max_cost_usd",
            "more than 0",
        ),
        # Only ASCII digits, and nothing around them: '٣' is a digit to int(), not to a caller.
        ("sku,title\n1,mug\n", {"template": "{title}", "n": "\u0663"}, "n", "whole number"),
        ("sku,title\n1,mug\n", {"template": "{title}", "n": " 2"}, "n", "whole number"),
        ("sku,title\n1,mug\n", {"template": "{title}", "labels": "{"}, "labels", "JSON object"),
        ("sku,title\n1,mug\n", {"template": "{title}", "labels": "[1]"}, "labels", "JSON object"),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "label.Bad": "x"},
            "labels.Bad",
            "[a-z0-9_.-]",
        ),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "templte": "x"},
            "templte",
            "did you mean 'template'",
        ),
        (
            "sku,title\n1,mug\n",
            {"template": "{title}", "id_column": "code"},
            "id_column",
            "not a column",
        ),
        ("sku,title\n1,mug\n", {"template": "{title}", "delimiter": "x"}, "delimiter", "one of"),
        ("sku,title,title\n1,mug,cup\n", {"template": "{sku}"}, "header", "more than once"),
        ("", {"template": "{title}"}, "rows", "the CSV is empty"),
        ("\n\n", {"template": "{title}"}, "rows", "the CSV is empty"),
        ("sku,title\n", {"template": "{title}"}, "rows", "no items"),
    ],
)
def test_csv_rejections(text: str, params: dict[str, str], field: str, fragment: str) -> None:
    err = error(reject_csv(text, **params), field)
    assert fragment in err.message, err.message


def test_csv_row_errors_name_index_id_and_line() -> None:
    text = "sku,title\n1,mug\n2,cup,extra\n3,\n,bowl\n1,plate\n"
    problem = reject_csv(text, template="a {title}")
    ragged = error(problem, "rows[1]")
    assert ragged.index == 1 and "CSV line 3 has 3 fields; the header has 2" in ragged.message
    assert not [e for e in problem.errors if e.index == 2]  # "a " is a prompt, if a short one
    empty_id = error(problem, "rows[3].sku")
    assert empty_id.index == 3 and "the id column 'sku' is empty (CSV line 5)" in empty_id.message
    dup = error(problem, "rows[4].id")
    assert (dup.index, dup.id) == (4, "1") and "already used by rows[0]" in dup.message


def test_csv_line_numbers_count_blank_lines_and_quoted_line_breaks() -> None:
    text = 'sku,title\n\n1,mug\n2,"tall\ncup"\n\n\n,vase\n4,bowl\n,plate\n'
    problem = reject_csv(text, template="a {title}")
    assert "(CSV line 8)" in error(problem, "rows[2].sku").message
    assert "(CSV line 10)" in error(problem, "rows[4].sku").message


def test_csv_empty_prompt_cell() -> None:
    problem = reject_csv("sku,prompt\n1,\n", status=422)
    err = error(problem, "rows[0].prompt")
    assert (err.index, err.id, err.message) == (0, "1", "prompt is empty")


def test_csv_refs_cell_errors() -> None:
    problem = reject_csv('sku,images\n1,"[oops"\n', template="x")
    assert "must be a JSON array" in error(problem, "rows[0].images").message
    problem = reject_csv("sku,images\n1,ftp://x\n", template="x")
    assert "is not an image reference" in error(problem, "rows[0].images[0]").message


def test_csv_unreadable_bodies_are_400() -> None:
    problem = reject_csv(b"sku,title\n1,\xff\xfe\n", status=400, template="{title}")
    assert "not UTF-8" in problem.detail and "0xff" in problem.detail
    problem = reject_csv('sku,title\n1,"mug"x\n', status=400, template="{title}")
    assert "line 2" in problem.detail


def test_csv_too_many_rows() -> None:
    text = "sku\n" + "".join(f"{i}\n" for i in range(20))
    with pytest.raises(Problem) as caught:
        parse_csv(text, max_items=5, template="x {sku}")
    assert caught.value.status == 422 and "more than 5 rows" in caught.value.detail


# ------------------------------------------------------------------------------------------
# Problems


def test_problem_shapes_and_helpers() -> None:
    assert PROBLEM_CONTENT_TYPE == "application/problem+json"
    p = validation_problem([FieldError("items[3].size", "bad size", 3, "sku-3")])
    assert p.to_dict() == {
        "type": "https://imagebatch.dev/problems/validation",
        "title": "The job is not valid",
        "status": 422,
        "detail": "items[3].size (item 3, id 'sku-3'): bad size.",
        "errors": [{"field": "items[3].size", "message": "bad size", "index": 3, "id": "sku-3"}],
    }
    assert (
        body_too_large(1024).status == 413 and body_too_large(1024).to_dict()["limit_bytes"] == 1024
    )
    assert not_found("job", "j1").status == 404 and "j1" in not_found("job", "j1").detail
    assert unauthorized().status == 401 and unauthorized().headers["WWW-Authenticate"].startswith(
        "Bearer"
    )
    assert conflict("Idempotency-Key reused").status == 409
    assert unsupported_media_type("text/xml", ("application/json", "text/csv")).status == 415
    # Raised without a type, the type follows the status.
    assert Problem(404, "No such job", "x").type.endswith("/not-found")
    assert Problem(503, "Not ready", "x").type == "about:blank"
    big = Problem(422, "t", "d", errors=[FieldError("f", "m")] * 250)
    assert len(big.errors) == MAX_FIELD_ERRORS and big.to_dict()["errors_omitted"] == 150


# ------------------------------------------------------------------------------------------
# Fuzz: no input may raise anything but Problem

_VALID = {
    "model": "gpt-image-2",
    "mode": "batch",
    "defaults": {"size": "1024x1024", "quality": "low", "output_format": "webp", "n": 1},
    "items": [
        {"id": "sku-1", "prompt": "a red mug", "quality": "medium", "output_compression": 50},
        {"id": "sku-2", "prompt": "a cup", "images": ["s3://b/k.jpg"], "mask": "file-abc"},
    ],
    "labels": {"campaign": "spring"},
    "max_cost_usd": 25.0,
    "webhook_url": "https://hooks.example/x",
}
_VALID_ROWS = {
    "template": "a {color} {title}",
    "rows": [{"id": "r1", "color": "red", "title": "mug"}],
}
_ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    1e308,
    -1e-308,
    0.5,
    "",
    " ",
    "two",
    "\u0000",
    "ü🙂",
    "{",
    "}",
    "{x}",
    "s3://",
    "data:image/png;base64,",
    "x" * 40_000,
    [],
    [None],
    ["s3://b/k"] * 20,
    {},
    {"a": {"b": [1, {"c": None}]}},
    "1024x1024",
    "transparent",
    "jpeg",
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            out += _paths(value, (*prefix, k))
    return out


def _odd(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(_ODD_VALUES))


def _mutate(doc: Any, rng: random.Random) -> Any:
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return _odd(rng)
    path = rng.choice(paths)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = rng.randrange(5)
    if action == 0 and isinstance(parent, dict):
        del parent[last]
    elif action == 1 and isinstance(parent, dict):
        parent[
            rng.choice(["extra", "Items", "prompt", "n", "id", "images", "rows", "template"])
        ] = _odd(rng)
    elif action == 2:
        nested: Any = _odd(rng)
        for _ in range(rng.randrange(1, 300)):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        parent[last] = nested
    elif action == 3 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    else:
        parent[last] = _odd(rng)
    return doc


def _outcome(call: Any) -> None:
    try:
        result = call()
    except Problem as problem:
        body = problem.to_dict()
        assert body["status"] in (400, 422) and body["detail"]
        assert len(orjson.dumps(body)) < 100_000
    else:
        assert isinstance(result, JobSpec) and result.items


def test_fuzz_json_mutations_only_raise_problem() -> None:
    rng = random.Random(1234)
    for _ in range(1500):
        doc = copy.deepcopy(rng.choice([_VALID, _VALID_ROWS]))
        for _ in range(rng.randrange(1, 4)):
            doc = _mutate(doc, rng)
        body = dumps(doc)
        _outcome(lambda body=body: parse(body))


def test_fuzz_raw_bytes_only_raise_problem() -> None:
    rng = random.Random(99)
    seed = orjson.dumps(_VALID)
    for _ in range(1500):
        raw = bytearray(seed)
        for _ in range(rng.randrange(1, 8)):
            pos = rng.randrange(len(raw))
            choice = rng.randrange(3)
            if choice == 0:
                raw[pos] = rng.randrange(256)
            elif choice == 1:
                del raw[pos : pos + rng.randrange(1, 20)]
            else:
                raw[pos:pos] = rng.choice(
                    [b"[", b"{", b'"', b"\\u0000", b"1e999", b"-", b"\xf0\x9f"]
                )
        _outcome(lambda raw=raw: parse(bytes(raw)))
    for text in [b"[" * 5000, b'{"items":' * 2000, b"\x00", "\ufeff{}".encode(), b"1" * 10_000]:
        _outcome(lambda text=text: parse(text))


def test_fuzz_csv_only_raises_problem() -> None:
    rng = random.Random(7)
    seed = b'sku,title,images\n1,"Mug, red",s3://b/1.jpg\n2,cup,"[""file-x""]"\n'
    keys = ["template", "n", "size", "labels", "label.x", "id_column", "delimiter", "mode", "zzz"]
    for _ in range(800):
        raw = bytearray(seed)
        for _ in range(rng.randrange(0, 6)):
            pos = rng.randrange(len(raw))
            raw[pos:pos] = rng.choice(
                [b'"', b",", b"\n", b"\r", b"\xff", b"{", b"\x00", b"[", b";"]
            )
        params = {"template": "a {title}"}
        for _ in range(rng.randrange(0, 3)):
            params[rng.choice(keys)] = rng.choice(["", "{", "2", "x" * 300, "[]", "{}", "sku", ";"])
        _outcome(
            lambda raw=raw, params=params: parse_job_csv(bytes(raw), params, CAT, max_items=10)
        )


def test_csv_lines_of_only_delimiters_before_the_header_are_skipped() -> None:
    spec = parse_job_csv(
        b",,\n\n sku ,title\n1,mug\n", {"template": "a {title}"}, CAT, max_items=10
    )
    assert [(item.id, item.prompt) for item in spec.items] == [("1", "a mug")]
