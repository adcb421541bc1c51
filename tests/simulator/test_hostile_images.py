"""Decompression bombs as reference images: refused from their header, one line at a time.

Each bomb is a real PNG (its deflate stream inflates to hundreds of MB of pixels) whose header
claims more pixels than an input image may have. Two kinds: one between one and two times
Pillow's limit (Pillow only warns; the simulator must refuse it itself) and one past twice the
limit (Pillow raises ``DecompressionBombError``). The simulator is a real process driven with the
official SDK; its peak resident memory shows it never inflated a bomb.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import openai
import pytest
from PIL import Image

from simulator.generation import MAX_INPUT_PIXELS
from tests.simulator.conftest import read_lines, submit, wait_status
from tests.support.simulator import SimulatorHandle

# Resident memory the simulator stays under; decoding the smaller bomb alone needs 576 MB.
PEAK_LIMIT_BYTES = 300 * 1024 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int, height: int, color_type: int) -> bytes:
    """A valid PNG of zero pixels (8-bit grey = 0, RGBA = 6), compressed ~200:1."""
    channels = {0: 1, 6: 4}[color_type]
    row = bytes(1 + width * channels)
    comp = zlib.compressobj(1)
    rows_per_block = 256
    block = row * rows_per_block
    parts = [comp.compress(block) for _ in range(height // rows_per_block)]
    parts += [comp.compress(row * (height % rows_per_block)), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", b"".join(parts)),
            _chunk(b"IEND", b""),
        )
    )


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (1024, 1024), (30, 90, 200)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    warned = bomb_png(12_000, 12_000, 6)  # 144 MP: over the limit, under Pillow's 2x error
    refused = bomb_png(20_000, 20_000, 0)  # 400 MP: Pillow itself raises
    assert MAX_INPUT_PIXELS < 12_000 * 12_000 < 2 * MAX_INPUT_PIXELS < 20_000 * 20_000
    return {"warned": warned, "refused": refused}


def peak_rss(sim: SimulatorHandle) -> int:
    """The process's high-water resident memory (VmHWM), in bytes."""
    assert sim.proc is not None
    status = Path(f"/proc/{sim.proc.pid}/status")
    if not status.exists():
        pytest.skip("no /proc on this machine to read a peak from")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def edit_line(custom_id: str, ref: dict[str, str]) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/images/edits",
        "body": {
            "model": "gpt-image-2",
            "prompt": f"make {custom_id} blue",
            "images": [ref],
            "quality": "low",
        },
    }


def test_a_bomb_fails_only_its_own_batch_line_with_invalid_image(make_sim, bombs):
    sim = make_sim()
    client = sim.client(max_retries=0)
    bomb_file = client.files.create(file=("bomb.png", bombs["refused"]), purpose="vision")
    good = {"image_url": data_url(small_png())}
    lines = [
        edit_line("good-0", good),
        edit_line("bomb-url", {"image_url": data_url(bombs["warned"])}),
        edit_line("good-1", good),
        edit_line("bomb-file", {"file_id": bomb_file.id}),
        edit_line("good-2", good),
    ]
    done = wait_status(client, submit(client, lines, endpoint="/v1/images/edits").id, timeout=60)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    assert sorted(x["custom_id"] for x in read_lines(client, done.output_file_id)) == [
        "good-0",
        "good-1",
        "good-2",
    ]
    errors = {x["custom_id"]: x for x in read_lines(client, done.error_file_id)}
    assert set(errors) == {"bomb-url", "bomb-file"}
    for custom_id, param in (
        ("bomb-url", "images[0].image_url"),
        ("bomb-file", "images[0].file_id"),
    ):
        response = errors[custom_id]["response"]
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "invalid_image",
            param,
            "invalid_request_error",
        )
        assert f"{MAX_INPUT_PIXELS:,} pixels" in error["message"]
    assert "12000x12000" in errors["bomb-url"]["response"]["body"]["error"]["message"]
    assert peak_rss(sim) < PEAK_LIMIT_BYTES


def test_a_bomb_in_a_sync_edit_is_a_400_invalid_image(make_sim, bombs):
    sim = make_sim()
    client = sim.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as json_edit:
        client.post(
            "/images/edits",
            body={
                "model": "gpt-image-2",
                "prompt": "make it blue",
                "images": [{"image_url": data_url(bombs["refused"])}],
            },
            cast_to=openai.types.ImagesResponse,
        )
    assert (json_edit.value.code, json_edit.value.param) == (
        "invalid_image",
        "images[0].image_url",
    )
    for name in ("warned", "refused"):
        with pytest.raises(openai.BadRequestError) as multipart:
            client.images.edit(
                model="gpt-image-2",
                prompt="make it blue",
                image=[("ok.png", small_png(), "image/png"), ("b.png", bombs[name], "image/png")],
            )
        assert (multipart.value.code, multipart.value.param) == ("invalid_image", "image")
    # The simulator is still well and answers the next request.
    assert client.images.generate(model="gpt-image-2", prompt="a mug", quality="low").data
    assert peak_rss(sim) < PEAK_LIMIT_BYTES
