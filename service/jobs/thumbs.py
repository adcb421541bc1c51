"""Thumbnails of a job's images: made once per image, on first view, and kept beside it.

A thumbnail is at most :data:`MAX_SIDE` pixels on its longer side, WebP, stored under
``jobs/{id}/thumbs/{name}.{sha256[:16]}.webp`` (:func:`service.storage.thumb_key`): the image's
content hash (the ``sha256`` its metadata carries) is part of the key, so an image made again in
place gets a new thumbnail and a stale one is never shown.

Made lazily rather than at collect time (bench/bench_console.py measures both): collect is the
hot path of every job, and most images of a large job are never looked at one by one; the first
view of a gallery page makes that page's thumbnails, later views read them. Two viewers making
the same thumbnail at once write the same bytes to the same key (a plain overwrite).

Failure semantics: :class:`~service.storage.ObjectNotFound` when the image does not exist;
:class:`ThumbnailError` when its bytes are not an image Pillow can read (it is never retried);
other storage errors propagate.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError

from service.storage import ObjectNotFound, Storage, thumb_key

MAX_SIDE = 256
QUALITY = 80
CONTENT_TYPE = "image/webp"
# An image larger than this is not thumbnailed (upstream makes at most ~4K images, a few MB).
MAX_SOURCE_BYTES = 64 * 1024 * 1024
# Decompression-bomb guard for what we decode: well above the largest upstream size (4K).
MAX_PIXELS = 40_000_000


class ThumbnailError(Exception):
    """The stored object is not an image that can be thumbnailed."""


def make_thumbnail(data: bytes) -> bytes:
    """WebP bytes of ``data`` (an image) scaled to fit :data:`MAX_SIDE` square."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ThumbnailError(f"image of {img.width}x{img.height} is too large")
            # draft() lets JPEG decode at 1/2, 1/4 or 1/8 scale: most of the work saved.
            img.draft("RGB", (MAX_SIDE, MAX_SIDE))
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
            out = img if img.mode in ("RGB", "RGBA") else img.convert("RGBA")
            buf = io.BytesIO()
            out.save(buf, "WEBP", quality=QUALITY, method=2)
            return buf.getvalue()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ThumbnailError(f"not a readable image: {exc}") from exc


def source_hash(storage: Storage, image: str) -> str:
    """The content hash of the image stored under ``image`` (its ``sha256`` metadata)."""
    info = storage.head(image)
    sha = info.metadata.get("sha256") or ""
    if len(sha) < 16:
        # An image stored without its hash (by hand, or by an old version): hash it.
        if info.size > MAX_SOURCE_BYTES:
            raise ThumbnailError(f"image of {info.size:,} bytes is too large to thumbnail")
        with storage.open(image) as fh:
            sha = hashlib.sha256(fh.read(MAX_SOURCE_BYTES + 1)).hexdigest()
    return sha.lower()


def thumbnail(storage: Storage, image: str, sha: str) -> bytes:
    """The thumbnail of the image under ``image`` (content hash ``sha``), made now if it is
    not stored yet."""
    key = thumb_key(image, sha)
    try:
        with storage.open(key) as fh:
            return fh.read()
    except ObjectNotFound:
        pass
    with storage.open(image) as fh:
        data = fh.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise ThumbnailError(f"image of over {MAX_SOURCE_BYTES:,} bytes is too large to thumbnail")
    thumb = make_thumbnail(data)
    storage.put_bytes(
        key,
        thumb,
        content_type=CONTENT_TYPE,
        metadata={"source-sha256": sha, "source": image.rsplit("/", 1)[-1]},
    )
    return thumb


__all__ = ["ThumbnailError", "make_thumbnail", "source_hash", "thumbnail"]
