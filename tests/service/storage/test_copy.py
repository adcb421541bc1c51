"""Storage.copy on both adapters: what result reuse relies on.

A copy carries the bytes, content type and metadata; it overwrites; a missing source raises
ObjectNotFound (so a vanished image is regenerated, never linked); locally it is a hard link.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.storage import ObjectNotFound, image_key
from tests.service.storage.test_storage import Backend, backend, read_all

__all__ = ["backend"]  # the fixture, parametrized over local and S3


def test_copy_carries_bytes_content_type_and_metadata(backend: Backend) -> None:
    s = backend.storage
    src, dst = image_key("job_a", "sku-1", "png"), image_key("job_b", "sku-1", "png")
    s.put_bytes(src, b"\x89PNG first", content_type="image/png", metadata={"job": "job_a"})
    s.copy(src, dst)
    assert read_all(s, dst) == b"\x89PNG first"
    info = s.head(dst)
    assert info.content_type == "image/png" and info.metadata == {"job": "job_a"}
    assert info.key == dst
    # Overwrites, like a write; the source is untouched.
    s.put_bytes(src, b"\x89PNG second", content_type="image/png")
    s.copy(src, dst)
    assert read_all(s, dst) == b"\x89PNG second"
    assert read_all(s, src) == b"\x89PNG second"


def test_copy_of_a_missing_object_raises_object_not_found(backend: Backend) -> None:
    s = backend.storage
    with pytest.raises(ObjectNotFound):
        s.copy(image_key("job_a", "gone", "png"), image_key("job_b", "gone", "png"))
    assert not s.exists(image_key("job_b", "gone", "png"))


def test_deleting_the_source_keeps_the_copy(backend: Backend) -> None:
    s = backend.storage
    src, dst = image_key("job_a", "sku-2", "webp"), image_key("job_b", "sku-2", "webp")
    s.put_bytes(src, b"RIFFwebp", content_type="image/webp")
    s.copy(src, dst)
    s.delete(src)
    assert read_all(s, dst) == b"RIFFwebp"
    with pytest.raises(ObjectNotFound):
        s.copy(src, image_key("job_c", "sku-2", "webp"))


def test_local_copy_is_a_hard_link(backend: Backend) -> None:
    if backend.kind != "local":
        pytest.skip("hard links are a local-directory matter")
    s = backend.storage
    root: Path = backend.info["root"]
    src, dst = image_key("job_a", "sku-3", "png"), image_key("job_b", "sku-3", "png")
    s.put_bytes(src, b"x" * 1000, content_type="image/png")
    s.copy(src, dst)
    a, b = os.stat(root / src), os.stat(root / dst)
    assert a.st_ino == b.st_ino and b.st_nlink == 2
    # The source replaced later (every write replaces, never edits in place): the copy keeps
    # the bytes it was made from.
    s.put_bytes(src, b"y" * 10, content_type="image/png")
    assert read_all(s, dst) == b"x" * 1000


def test_copy_many_reports_each_pair(backend: Backend) -> None:
    s = backend.storage
    keys = [image_key("job_a", f"sku-{i}", "png") for i in range(5)]
    for i, key in enumerate(keys):
        s.put_bytes(key, f"image {i}".encode(), content_type="image/png")
    s.delete(keys[2])
    pairs = [(key, key.replace("job_a", "job_b")) for key in keys]
    results = s.copy_many(pairs)
    assert [r is None for r in results] == [True, True, False, True, True]
    assert isinstance(results[2], ObjectNotFound)
    for i in (0, 1, 3, 4):
        assert read_all(s, pairs[i][1]) == f"image {i}".encode()
    assert not s.exists(pairs[2][1])
    with pytest.raises(ValueError):
        s.copy_many([(keys[0], "../escape.png")])
