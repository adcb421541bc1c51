"""The object layout: every key imagebatch writes, built here and nowhere else.

Keys are relative to the storage prefix or root::

    jobs/{job_id}/request.jsonl
    jobs/{job_id}/request.v{n}.jsonl            (the request before retry n changed it)
    jobs/{job_id}/images/{item_id}.{ext}        (n > 1: {item_id}-{k}.{ext})
    jobs/{job_id}/manifest.jsonl
    jobs/{job_id}/thumbs/{image name}.{sha256[:16]}.webp   (the console's thumbnail of an image)
"""

from __future__ import annotations

import re

# Ids that go into keys: the same charset intake allows for item ids.
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")


def job_prefix(job_id: str) -> str:
    """Everything a job stored lives under this prefix."""
    return f"jobs/{_checked_id('job_id', job_id)}/"


def request_key(job_id: str) -> str:
    """The job's request as accepted at intake, one item per line."""
    return f"{job_prefix(job_id)}request.jsonl"


def request_version_key(job_id: str, version: int) -> str:
    """The request as it was before retry ``version`` overrode some of its items: versions are
    kept, never rewritten, so whatever a caller submitted stays readable."""
    if version < 1:
        raise ValueError(f"request version must be >= 1, got {version}")
    return f"{job_prefix(job_id)}request.v{version}.jsonl"


def manifest_key(job_id: str) -> str:
    """The finished job's record: one line per item (id, status, keys, usage, cost, error)."""
    return f"{job_prefix(job_id)}manifest.jsonl"


def image_key(job_id: str, item_id: str, ext: str, k: int | None = None) -> str:
    """Where an item's image goes.

    ``k`` is the image's 0-based index in the upstream response's ``data`` when the item asked
    for ``n > 1`` images; pass None for ``n == 1``. Deterministic, so a redelivered collect
    overwrites instead of duplicating.
    """
    item = _checked_id("item_id", item_id)
    if not _EXT_RE.fullmatch(ext):
        raise ValueError(f"image extension {ext!r} must be 1-8 lower-case letters or digits")
    if k is None:
        return f"{job_prefix(job_id)}images/{item}.{ext}"
    if k < 0:
        raise ValueError(f"image index k must be >= 0, got {k}")
    return f"{job_prefix(job_id)}images/{item}-{k}.{ext}"


def thumb_key(image: str, sha256: str) -> str:
    """Where the thumbnail of the image stored under ``image`` goes, beside the job's images.

    The image's content hash is part of the key: an image redone in place (same key, new bytes)
    gets a new thumbnail instead of showing the old one.
    """
    job_dir, sep, name = image.partition("/images/")
    if not sep or "/" in name or not job_dir.startswith("jobs/"):
        raise ValueError(f"{image!r} is not an image key of a job")
    if not re.fullmatch(r"[0-9a-f]{16,64}", sha256):
        raise ValueError(f"sha256 {sha256!r} must be lower-case hex")
    stem = name.rsplit(".", 1)[0]
    return f"{job_dir}/thumbs/{stem}.{sha256[:16]}.webp"


def _checked_id(name: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value
