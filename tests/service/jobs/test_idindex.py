"""The compact id index intake checks item ids with, and the compact forms items are held in."""

from __future__ import annotations

import random

import orjson
import pytest

from service.catalog import EDITS, GENERATIONS, cached_catalog
from service.jobs.idindex import IdIndex
from service.jobs.jsonbody import RawSeq
from service.jobs.request import request_record
from service.jobs.schema import ItemList, ItemSpec
from service.jobs.spec import parse_job_json

CAT = cached_catalog()


def test_an_id_seen_before_gives_the_index_that_used_it_first() -> None:
    seen = IdIndex()  # grows from its smallest table
    ids = [f"sku-{i}" for i in range(5000)]
    for index, item_id in enumerate(ids):
        assert seen.first(item_id, index) == index
    assert len(seen) == 5000
    rng = random.Random(7)
    for _ in range(500):
        index = rng.randrange(5000)
        assert seen.first(ids[index], 9999) == index
    assert seen.first("sku-5000", 5000) == 5000 and len(seen) == 5001


def test_ids_that_differ_only_in_case_or_length_are_different() -> None:
    seen = IdIndex(4)
    assert [seen.first(i, n) for n, i in enumerate(["a", "A", "aa", "a.", "a"])] == [0, 1, 2, 3, 0]


def test_an_item_without_an_id_takes_its_index_as_its_id() -> None:
    seen = IdIndex(8)
    assert seen.first_implicit(0) == 0
    assert seen.first("0", 1) == 0  # the index item 0 took
    assert seen.first("00", 2) == 2  # not an index: a different id
    assert seen.first("5", 3) == 3  # item 5 comes later...
    assert seen.first_implicit(4) == 4
    assert seen.first_implicit(5) == 3  # ...and its index is taken
    assert seen.first("abc", 6) == 6
    assert seen.first("6", 7) == 7  # item 6 gave an id of its own: "6" is free
    assert len(seen) == 4  # ids without an id of their own are not written down


def test_many_items_without_ids_cost_a_bit_each() -> None:
    seen = IdIndex(100_000)
    assert all(seen.first_implicit(i) == i for i in range(100_000))
    assert len(seen) == 0
    assert seen.first("99999", 100_000) == 99_999 and seen.first("100000", 100_001) == 100_001


def test_a_raw_sequence_gives_its_elements_back_once() -> None:
    seq = RawSeq()
    values = [{"prompt": "é" * (i % 300), "n": i} for i in range(20_000)] + [1, "x", None, [2]]
    for value in values:
        seq.append_json(orjson.dumps(value))
    assert len(seq) == len(values)
    assert list(seq.drain()) == values
    assert len(seq) == 0


def test_an_item_list_reads_back_the_bodies_intake_always_wrote() -> None:
    items = ItemList("gpt-image-2", {"size": "1024x1024", "quality": "low"})
    items.append(0, "a", GENERATIONS, "red mug")
    items.append(1, "b", GENERATIONS, "blue mug", {"quality": "high", "n": 2})
    items.append(2, "c", EDITS, "green mug", None, ["s3://b/1.png"], "s3://b/m.png")
    plain = [
        ItemSpec(
            0,
            "a",
            GENERATIONS,
            {"model": "gpt-image-2", "prompt": "red mug", "size": "1024x1024", "quality": "low"},
        ),
        ItemSpec(
            1,
            "b",
            GENERATIONS,
            {
                "model": "gpt-image-2",
                "prompt": "blue mug",
                "size": "1024x1024",
                "quality": "high",
                "n": 2,
            },
        ),
        ItemSpec(
            2,
            "c",
            EDITS,
            {
                "model": "gpt-image-2",
                "prompt": "green mug",
                "size": "1024x1024",
                "quality": "low",
                "images": ["s3://b/1.png"],
                "mask": "s3://b/m.png",
            },
        ),
    ]
    assert len(items) == 3 and items == plain and list(items) == plain
    assert items[-1] == plain[2] and items[1:] == plain[1:]
    assert list(items.ids()) == ["a", "b", "c"] and items.images == 4
    # The stored request is byte for byte what a list of ItemSpec wrote (key order included).
    assert [request_record(i) for i in items] == [request_record(i) for i in plain]


def test_a_large_job_is_held_in_about_its_own_size() -> None:
    prompt = "Studio photo of a red ceramic mug on white, soft light, " * 3
    items = [{"id": f"sku-{i}", "prompt": f"{prompt}{i}", "quality": "low"} for i in range(20_000)]
    body = orjson.dumps({"defaults": {"size": "1024x1024"}, "items": items})
    spec = parse_job_json(body, CAT, max_items=20_000)
    assert isinstance(spec.items, ItemList) and len(spec.items) == 20_000
    assert spec.items[12_345].id == "sku-12345" and spec.items[12_345].quality == "low"
    assert spec.items.nbytes < 1.2 * len(body)  # a list of ItemSpec held about 3x the body


def test_items_without_ids_read_back_with_their_index() -> None:
    items = ItemList("gpt-image-2", {})
    items.append(0, "0", GENERATIONS, "red mug")
    items.append(1, "sku-1", GENERATIONS, "blue mug")
    items.append(2, "2", GENERATIONS, "green mug")
    assert list(items.ids()) == ["0", "sku-1", "2"]
    assert [(i.index, i.id) for i in items] == [(0, "0"), (1, "sku-1"), (2, "2")]
    assert items[2].id == "2" and items[2].index == 2


def test_items_are_appended_in_order() -> None:
    items = ItemList("gpt-image-2", {})
    items.append(0, "a", GENERATIONS, "red mug")
    with pytest.raises(ValueError, match="out of order"):
        items.append(2, "c", GENERATIONS, "green mug")


def test_prompts_of_every_shape_read_back_as_written() -> None:
    prompts = ["x", '"quoted"', "[bracketed]", "two\nlines", "tab\tand \\ slash", "é ✓ 🙂", " "]
    prompts += ['{"json": 1}', "null", "123", "line\r\nend", "\u2028"]
    items = ItemList("gpt-image-2", {})
    for index, prompt in enumerate(prompts):
        items.append(index, str(index), GENERATIONS, prompt)
    items.append(len(prompts), "sku", GENERATIONS, "[")  # a record line beside prompt lines
    assert [item.prompt for item in items] == [*prompts, "["]
    assert [items[i].prompt for i in range(len(prompts))] == prompts
    assert items[-1].id == "sku" and items[3].id == "3"
