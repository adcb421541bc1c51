"""Pictures: decodable at the requested size and format, deterministic, distinct, padded on demand."""

from __future__ import annotations

import base64
import hashlib
import io
import zlib

import pytest
from PIL import Image

from simulator.images import Picture, Renderer, adler32_combine

PROMPT = "Studio photo of a red ceramic mug on white, soft light from the left, 50mm"


def seed(k: int) -> bytes:
    return hashlib.sha256(str(k).encode()).digest()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize(
    ("width", "height", "fmt", "transparent", "pil_format"),
    [
        (1024, 1024, "png", False, "PNG"),
        (1536, 1024, "png", True, "PNG"),
        (1024, 1536, "jpeg", False, "JPEG"),
        (1024, 1024, "webp", False, "WEBP"),
        (1024, 1024, "webp", True, "WEBP"),
        (2048, 1152, "png", False, "PNG"),
        (1040, 720, "png", False, "PNG"),
    ],
)
def test_every_format_decodes_at_the_requested_size(width, height, fmt, transparent, pil_format):
    data = Renderer().render(Picture(width, height, fmt, transparent), PROMPT, "image 1/1", seed(1))
    img = decode(data)
    assert img.format == pil_format
    assert img.size == (width, height)
    corner = img.convert("RGBA").getpixel((0, 0))
    assert isinstance(corner, tuple)
    if transparent:
        assert corner[3] == 0, "a transparent background must be see-through"
    else:
        assert corner[3] == 255


def test_same_request_same_bytes_and_items_differ():
    renderer = Renderer()
    pic = Picture(1024, 1024, "png")
    a = renderer.render(pic, PROMPT, "image 1/2", seed(1))
    assert Renderer().render(pic, PROMPT, "image 1/2", seed(1)) == a
    b = renderer.render(pic, PROMPT, "image 2/2", seed(2))
    assert a != b
    assert decode(a).tobytes() != decode(b).tobytes(), (
        "the pictures themselves differ, not just metadata"
    )


def test_the_picture_shows_the_prompt_and_plain_images_do_not():
    pic = Picture(1024, 1024, "png")
    shown = decode(Renderer().render(pic, PROMPT, "x", seed(1))).convert("L")
    other = decode(Renderer().render(pic, PROMPT + " at dusk, wide angle", "x", seed(1))).convert(
        "L"
    )
    plain = decode(Renderer(draw_prompt=False).render(pic, PROMPT, "x", seed(1))).convert("L")

    # The prompt is drawn as dark text on the band: more dark pixels with a prompt than without.
    def dark(img: Image.Image) -> int:
        return sum(img.histogram()[:80])

    assert dark(shown) > dark(plain) + 2000
    assert dark(other) > dark(shown)


def test_prompts_outside_latin1_still_render():
    data = Renderer().render(Picture(1024, 1024, "png"), "赤いマグカップ 🍵 on white", "x", seed(3))
    assert decode(data).size == (1024, 1024)


@pytest.mark.parametrize(
    ("fmt", "transparent"), [("png", False), ("jpeg", False), ("webp", False), ("webp", True)]
)
def test_padding_reaches_about_the_asked_size_and_still_decodes(fmt, transparent):
    target = 1_500_000
    renderer = Renderer(pad_to=target)
    pic = Picture(1024, 1024, fmt, transparent)
    data = renderer.render(pic, PROMPT, "x", seed(4))
    assert target - 4100 < len(data) <= target + 32
    assert decode(data).size == (1024, 1024)
    # The base64 form (cached padded head + the natural rest) is the same file.
    assert base64.b64decode(b"".join(renderer.render_b64(pic, PROMPT, "x", seed(4)))) == data
    # Filler is incompressible, as real image data is.
    assert len(zlib.compress(data, 1)) > 0.9 * len(data)


def test_adler32_combine_matches_zlib():
    a, b = b"x" * 70_001 + b"abc", bytes(range(256)) * 300
    assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


def test_bad_pictures_are_refused():
    with pytest.raises(ValueError):
        Picture(1024, 1024, "gif")
    with pytest.raises(ValueError):
        Picture(1024, 1024, "jpeg", transparent=True)
