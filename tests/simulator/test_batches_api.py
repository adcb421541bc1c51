"""Files and Batches through the official SDK: the lifecycle, every way a batch ends, and billing."""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image

from tests.simulator.conftest import gen_line, jsonl, read_lines, submit, wait_status
from tests.simulator.schemas import check
from tests.support.procs import wait_until


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def usage_sum(lines: list[dict[str, Any]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for line in lines:
        usage = line["response"]["body"]["usage"]
        total["text_input"] += usage["input_tokens_details"]["text_tokens"]
        total["image_input"] += usage["input_tokens_details"]["image_tokens"]
        total["image_output"] += usage["output_tokens"]
    return total


def png_data_url(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_a_batch_runs_to_completed_with_real_images_and_billing(client, sim):
    lines = [gen_line(f"sku-{i}", f"mug number {i}", n=1 + i % 2) for i in range(30)]
    lines[3]["body"].update(size="1536x1024", output_format="jpeg")
    batch = submit(client, lines, metadata={"job": "j-1", "chunk": "0"})
    assert batch.status == "validating"
    assert batch.request_counts is not None and batch.request_counts.total == 0
    done = wait_status(client, batch.id)
    check("Batch", client.batches.with_raw_response.retrieve(batch.id).http_response.json())
    assert done.status == "completed"
    assert done.metadata == {"job": "j-1", "chunk": "0"}
    assert done.model == "gpt-image-2"
    assert done.request_counts is not None
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (30, 30, 0)
    assert done.error_file_id is None
    assert (
        done.created_at
        <= (done.in_progress_at or 0)
        <= (done.finalizing_at or 0)
        <= (done.completed_at or 0)
    )
    assert done.expires_at == done.created_at + 86400

    out_file = client.files.retrieve(done.output_file_id or "")
    check("OpenAIFile", out_file.model_dump())
    assert out_file.purpose == "batch_output" and out_file.filename == f"{batch.id}_output.jsonl"

    out = read_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"sku-{i}" for i in range(30))
    assert [line["custom_id"] for line in out] != [f"sku-{i}" for i in range(30)], (
        "output order is shuffled"
    )
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith(
            "req_"
        )
        check("ImagesResponse", line["response"]["body"])
        i = int(line["custom_id"].split("-")[1])
        images = [decode(d["b64_json"]) for d in line["response"]["body"]["data"]]
        assert len(images) == 1 + i % 2
        assert {im.size for im in images} == {(1536, 1024) if i == 3 else (1024, 1024)}
        assert {im.format for im in images} == {"JPEG" if i == 3 else "PNG"}

    billed = sim.stats()["batches"][batch.id]
    assert billed["tokens"] == dict(usage_sum(out)) | {"image_input": 0}
    assert billed["images"] == sum(1 + i % 2 for i in range(30))
    assert (billed["lines_completed"], billed["lines_failed"]) == (30, 0)
    assert done.usage is not None
    assert done.usage.output_tokens == billed["tokens"]["image_output"]
    assert done.usage.input_tokens == billed["tokens"]["text_input"]


def test_lines_that_fail_go_to_the_error_file_and_the_batch_completes(client, sim):
    lines = [
        gen_line("ok-1"),
        gen_line("bad-size", size="512x512"),
        gen_line("blocked", "a picture of gore"),
        gen_line("bad-n", n=20),
        gen_line("ok-2"),
    ]
    done = wait_status(client, submit(client, lines).id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 3)
    errors = {line["custom_id"]: line for line in read_lines(client, done.error_file_id)}
    assert set(errors) == {"bad-size", "blocked", "bad-n"}
    for line in errors.values():
        assert line["error"] is None and line["response"]["status_code"] == 400
        check("ErrorResponse", line["response"]["body"])
    assert errors["bad-size"]["response"]["body"]["error"]["param"] == "size"
    blocked = errors["blocked"]["response"]["body"]["error"]
    assert (blocked["code"], blocked["type"]) == (
        "moderation_blocked",
        "image_generation_user_error",
    )
    assert blocked["moderation_details"] == {
        "moderation_stage": "input",
        "categories": ["violence"],
    }
    assert {line["custom_id"] for line in read_lines(client, done.output_file_id)} == {
        "ok-1",
        "ok-2",
    }
    assert sim.stats()["batches"][done.id]["lines_failed"] == 3


def test_edits_batch_with_json_bodies(client, sim):
    ref = client.files.create(
        file=("ref.png", base64.b64decode(png_data_url(1536, 1024).split(",")[1])), purpose="vision"
    )
    lines = [
        {
            "custom_id": f"edit-{i}",
            "method": "POST",
            "url": "/v1/images/edits",
            "body": {
                "model": "gpt-image-2",
                "prompt": f"make mug {i} blue",
                "images": [{"image_url": png_data_url(1024, 1024)}, {"file_id": ref.id}],
                "quality": "low",
            },
        }
        for i in range(3)
    ]
    done = wait_status(client, submit(client, lines, endpoint="/v1/images/edits").id)
    assert done.status == "completed", done
    out = read_lines(client, done.output_file_id)
    assert len(out) == 3
    billed = sim.stats()["batches"][done.id]["tokens"]
    assert billed == dict(usage_sum(out))
    assert billed["image_input"] > 0


@pytest.mark.parametrize(
    ("lines", "code", "line_no"),
    [
        ([json.dumps(gen_line("a")), "{not json"], "invalid_json_line", 2),
        ([gen_line("a"), gen_line("a")], "duplicate_custom_id", 2),
        ([gen_line("a"), {**gen_line("b"), "url": "/v1/images/edits"}], "url_mismatch", 2),
        ([gen_line("a"), gen_line("b", model="gpt-image-1.5")], "model_mismatch", 2),
        ([gen_line("a", model="gpt-image-99")], "model_not_found", 1),
        ([gen_line("a", model="gpt-image-1")], "model_not_found", 1),
        ([gen_line("a", model="gpt-image-2.5-flare")], "unsupported_model", 1),
        ([], "empty_file", None),
    ],
)
def test_validation_failures_fail_the_batch_with_errors(client, lines, code, line_no):
    batch = submit(client, lines)
    done = wait_status(client, batch.id)
    check("Batch", done.model_dump())
    assert done.status == "failed" and done.failed_at
    assert done.output_file_id is None and done.error_file_id is None
    assert done.errors is not None and done.errors.data
    first = done.errors.data[0]
    assert (first.code, first.line) == (code, line_no)
    assert first.message


def test_over_fifty_thousand_lines_is_too_many_tasks(client):
    line = json.dumps(gen_line("x")).encode()
    body = b"".join(line.replace(b'"x"', f'"c{i}"'.encode()) + b"\n" for i in range(50_001))
    f = client.files.create(file=("big.jsonl", body), purpose="batch")
    done = wait_status(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h"
        ).id,
    )
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data[0].code == "too_many_tasks"


def test_input_over_the_byte_cap_is_file_too_large(make_sim):
    client = make_sim(max_batch_bytes=2_000).client()
    done = wait_status(client, submit(client, [gen_line(f"c{i}", "x" * 200) for i in range(20)]).id)
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data[0].code == "file_too_large"


def test_enqueued_token_limit_fails_after_create(make_sim):
    sim = make_sim(rate=2, batch_queue_tokens=120)
    client = sim.client()
    first = submit(
        client, [gen_line(f"a{i}", "one two three") for i in range(10)]
    )  # 10 lines of 9 tokens
    first = wait_status(client, first.id, ("in_progress",))
    second = submit(client, [gen_line(f"b{i}", "one two three") for i in range(5)])
    assert second.status == "validating", "create succeeds; the queue is checked when validating"
    second = wait_status(client, second.id)
    assert second.status == "failed"
    assert second.errors is not None
    error = second.errors.data[0]
    assert (error.code, error.line, error.param) == ("token_limit_exceeded", None, None)
    assert "Enqueued token limit reached for gpt-image-2" in (error.message or "")
    stats = sim.stats()
    assert stats["models"]["gpt-image-2"]["enqueued_tokens"] == 90
    assert stats["models"]["gpt-image-2"]["peak_enqueued_tokens"] == 90
    client.batches.cancel(first.id)
    wait_status(client, first.id)
    assert sim.stats()["models"]["gpt-image-2"]["enqueued_tokens"] == 0


def test_cancel_keeps_finished_lines_and_cancels_the_rest(make_sim):
    sim = make_sim(rate=10, finalize_seconds=0.3)
    client = sim.client()
    batch = submit(client, [gen_line(f"c{i}") for i in range(100)])
    wait_until(
        lambda: (
            (client.batches.retrieve(batch.id).request_counts or None)
            and client.batches.retrieve(batch.id).request_counts.completed >= 3
        ),
        timeout=20,
    )  # type: ignore[union-attr]
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_status(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and counts.completed >= 3 and counts.completed + counts.failed == 100
    out = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert len(out) == counts.completed and len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)
    assert {line["custom_id"] for line in out + errors} == {f"c{i}" for i in range(100)}
    assert (
        sim.stats()["batches"][batch.id]["tokens"]["image_output"] == usage_sum(out)["image_output"]
    )
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(wait_status(client, submit(client, [gen_line("z")]).id).id)


def test_expiry_returns_finished_lines_billed_and_the_rest_batch_expired(make_sim):
    sim = make_sim(rate=10, completion_window=1.5)
    client = sim.client()
    batch = submit(client, [gen_line(f"e{i}") for i in range(100)])
    done = wait_status(client, batch.id)
    assert done.status == "expired" and done.expired_at
    out = read_lines(client, done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    assert 5 <= len(out) < 100
    assert len(out) + len(errors) == 100
    assert errors[0]["error"] == {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    }
    billed = sim.stats()["batches"][batch.id]
    assert billed["tokens"]["image_output"] == usage_sum(out)["image_output"] > 0


def test_a_batch_whose_lines_all_fail_completes_without_an_output_file(make_sim):
    sim = make_sim(fail_rate=1.0)
    client = sim.client()
    done = wait_status(client, submit(client, [gen_line(f"f{i}") for i in range(8)]).id)
    assert done.status == "completed"
    assert done.output_file_id is None and done.error_file_id
    assert done.request_counts is not None and done.request_counts.failed == 8
    for line in read_lines(client, done.error_file_id):
        assert line["error"] is None
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"
    assert sim.stats()["batches"][done.id]["server_errors_injected"] == 8


def test_list_batches_paginates_newest_first(client):
    ids = [submit(client, [gen_line("p")]).id for _ in range(3)]
    page = client.batches.with_raw_response.list(limit=2).http_response.json()
    check("ListBatchesResponse", page)
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True and page["last_id"] == ids[1]
    nxt = client.batches.list(limit=2, after=ids[1])
    assert nxt.data[0].id == ids[0]
    assert set(ids) <= {b.id for b in client.batches.list(limit=2)}  # the SDK walks every page


def test_files_list_retrieve_delete(client):
    f = client.files.create(file=("notes.jsonl", jsonl([gen_line("n")])), purpose="batch")
    check("OpenAIFile", f.model_dump())
    assert f.expires_at == f.created_at + 30 * 86400
    listing = client.files.with_raw_response.list(purpose="batch").http_response.json()
    check("ListFilesResponse", listing)
    assert f.id in [x["id"] for x in listing["data"]]
    user = client.files.create(
        file=("x.bin", b"abc"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert user.expires_at == user.created_at + 3600
    assert f.id not in [x.id for x in client.files.list(purpose="user_data")]
    assert client.files.content(f.id).read() == jsonl([gen_line("n")])
    deleted = client.files.with_raw_response.delete(f.id).http_response.json()
    check("DeleteFileResponse", deleted)
    assert deleted == {"id": f.id, "object": "file", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"file": ("in.txt", b"{}"), "purpose": "batch"}, "file"),
        ({"file": ("in.jsonl", b"{}"), "purpose": "fine-tune"}, "purpose"),
    ],
)
def test_bad_uploads_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(**kwargs)
    assert info.value.param == param


def test_bad_batch_creates_are_400_naming_the_field(client):
    good = client.files.create(file=("in.jsonl", jsonl([gen_line("a")])), purpose="batch")
    vision = client.files.create(file=("a.png", b"png"), purpose="vision")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"input_file_id": vision.id}, "input_file_id"),
        ({"endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"endpoint": "/v1/nothing"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ]
    for override, param in cases:
        args: dict[str, Any] = {
            "input_file_id": good.id,
            "endpoint": "/v1/images/generations",
            "completion_window": "24h",
            **override,
        }
        with pytest.raises(openai.BadRequestError) as info:
            client.batches.create(**args)
        assert info.value.param == param, override
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_a_restarted_simulator_keeps_files_and_resumes_batches(make_sim):
    sim = make_sim(rate=150)
    client = sim.client(max_retries=5)
    batch = submit(client, [gen_line(f"r{i}", f"restart {i}") for i in range(600)])
    wait_until(
        lambda: (c := client.batches.retrieve(batch.id).request_counts) and c.completed >= 300,
        timeout=30,
    )
    sim.kill()
    sim.start()
    resumed = client.batches.retrieve(batch.id)
    assert resumed.status == "in_progress"
    done = wait_status(client, batch.id, timeout=60)
    assert done.status == "completed"
    out = read_lines(client, done.output_file_id)
    ids = [line["custom_id"] for line in out]
    assert len(ids) == 600 and len(set(ids)) == 600, "every line exactly once"
    assert client.files.retrieve(batch.input_file_id).purpose == "batch"
    billed = sim.stats()["batches"][batch.id]
    assert billed["tokens"] == dict(usage_sum(out)) | {"image_input": 0}
    assert billed["lines_completed"] == 600


def test_reset_clears_what_was_billed(make_sim):
    sim = make_sim()
    client = sim.client()
    client.images.generate(model="gpt-image-2", prompt="count me", quality="low")
    wait_status(client, submit(client, [gen_line("s")]).id)
    assert sim.stats()["sync"]["images"] == 1 and sim.stats()["batches"]
    cleared = sim.reset()
    assert (
        cleared["sync"]["images"] == 0
        and cleared["batches"] == {}
        and cleared["batch"]["images"] == 0
    )
    done = wait_status(client, submit(client, [gen_line("t")]).id)
    assert list(sim.stats()["batches"]) == [done.id]


def test_streamed_content_is_the_file_on_disk(client, sim):
    done = wait_status(client, submit(client, [gen_line(f"s{i}") for i in range(5)]).id)
    resp = httpx2.get(f"{sim.url}/files/{done.output_file_id}/content")
    assert (
        int(resp.headers["content-length"])
        == len(resp.content)
        == client.files.retrieve(done.output_file_id or "").bytes
    )


def test_downloads_can_be_paced_to_play_a_slow_upstream(make_sim):
    sim = make_sim(download_bytes_per_second=200_000)
    client = sim.client(max_retries=0)
    body = b"x" * 300_000 + b"\n"
    f = client.files.create(file=("big.jsonl", body), purpose="batch")
    start = time.monotonic()
    with client.files.with_streaming_response.content(f.id) as resp:
        got = b"".join(resp.iter_bytes(65536))
    took = time.monotonic() - start
    # 300 kB at 200 kB/s: about 1.5 s, the same bytes as unpaced.
    assert got == body
    assert 1.3 <= took < 10, took


def test_a_slow_create_still_makes_the_batch_when_the_client_gave_up(make_sim):
    sim = make_sim(create_delay=1.5)
    with sim.client(max_retries=0, timeout=0.4) as impatient, pytest.raises(openai.APITimeoutError):
        submit(impatient, [gen_line("0")], metadata={"tag": "slow"})
    with sim.client() as client:
        assert [b for b in client.batches.list() if (b.metadata or {}).get("tag")] == []
        # Like upstream, the create goes on without its client: the batch appears afterwards.
        made = wait_until(
            lambda: [b for b in client.batches.list() if (b.metadata or {}).get("tag") == "slow"],
            timeout=10,
            message="the slow create to land",
        )
        assert len(made) == 1
