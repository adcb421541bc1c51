"""Thumbnails: at most 256 px on the longer side, WebP, made once and kept beside the image, a new
one when the image is made again in place, and a clear error for bytes that are not an image."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.jobs import thumbs
from service.settings import Settings
from service.storage import Storage, open_storage, thumb_key


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return open_storage(Settings(storage_url=(tmp_path / "s").as_uri(), data_dir=tmp_path))


def png(size: tuple[int, int], colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def put(storage: Storage, key: str, data: bytes, sha: str) -> None:
    storage.put_bytes(key, data, content_type="image/png", metadata={"sha256": sha})


def test_made_once_small_and_kept_beside_the_image(storage: Storage) -> None:
    key = "jobs/job_1/images/sku-1.png"
    put(storage, key, png((1536, 1024), "red"), "a" * 64)
    sha = thumbs.source_hash(storage, key)
    first = thumbs.thumbnail(storage, key, sha)
    with Image.open(io.BytesIO(first)) as img:
        assert img.format == "WEBP" and img.size == (256, 171)
    assert storage.exists(thumb_key(key, sha))
    storage.delete(key)  # the second view reads the stored thumbnail, not the image
    assert thumbs.thumbnail(storage, key, sha) == first


def test_an_image_made_again_in_place_gets_a_new_thumbnail(storage: Storage) -> None:
    key = "jobs/job_1/images/sku-2.png"
    put(storage, key, png((64, 64), "red"), "a" * 64)
    old = thumbs.thumbnail(storage, key, thumbs.source_hash(storage, key))
    put(storage, key, png((64, 64), "blue"), "b" * 64)
    new = thumbs.thumbnail(storage, key, thumbs.source_hash(storage, key))
    assert old != new
    with Image.open(io.BytesIO(new)) as img:
        assert img.convert("RGB").getpixel((10, 10))[2] > 200  # blue


def test_an_image_stored_without_its_hash_is_hashed(storage: Storage) -> None:
    key = "jobs/job_1/images/sku-3.png"
    storage.put_bytes(key, png((32, 32), "green"), content_type="image/png")
    assert len(thumbs.source_hash(storage, key)) == 64


def test_bytes_that_are_not_an_image_are_a_thumbnail_error() -> None:
    with pytest.raises(thumbs.ThumbnailError):
        thumbs.make_thumbnail(b"not an image at all")
