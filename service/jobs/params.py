"""The image request parameters and image references of a job: is this value acceptable?

Owns the checks of one value at a time against the job's model (size, quality, output_format,
n, background, output_compression, moderation), the conflicts between background, output_format
and output_compression, and the shape of an image reference or a URL (the webhook, an https
reference).

Failure semantics: each check returns why a value is refused as a message (``None`` when it is
acceptable) and never raises for any input; the caller files the message under the field's path.
The only exception is an ``AssertionError`` for a parameter name this module has no check for,
which means ``PARAM_FIELDS`` and :func:`param_problem` disagree (a bug, not bad input).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from service.catalog import Model
from service.jobs.messages import json_type, show
from service.jobs.schema import (
    ALPHA_FORMATS,
    BACKGROUNDS,
    COMPRESSIBLE_FORMATS,
    DEFAULT_OUTPUT_FORMAT,
    MAX_IMAGE_URL_CHARS,
    MAX_N,
    MAX_REF_URL_CHARS,
    MAX_WEBHOOK_URL_CHARS,
    MODERATIONS,
)

# The parameters that can conflict with one another (see :func:`combo_problem`).
COMBO_PARAMS = frozenset(("background", "output_format", "output_compression"))
_FILE_ID_RE = re.compile(r"file-[A-Za-z0-9_-]{1,200}\Z")
_DATA_URL_RE = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+\Z")


def param_problem(name: str, value: Any, model: Model | None) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name`` of ``model``, or None.

    With no model (the job's model was refused) only what needs no model is checked.
    """
    if name in ("n", "output_compression"):
        low, high = (1, MAX_N) if name == "n" else (0, 100)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be a whole number from {low} to {high}, not {show(value)}"
        if not low <= value <= high:
            return f"{name} must be from {low} to {high}, got {show(value)}"
        return None
    if not isinstance(value, str):
        return f"{name} must be a string, not {json_type(value)}"
    if name == "size":
        if len(value) > 16:
            return f"size must be 'auto' or WIDTHxHEIGHT, not {show(value)}"
        return model.size_problem(value) if model is not None else None
    if name == "quality":
        if model is not None and value not in model.qualities:
            return (
                f"quality {show(value)} is not offered by {model.id}; "
                f"use one of {', '.join(model.qualities)}"
            )
        return None
    if name == "output_format":
        if model is not None and value not in model.formats:
            return (
                f"output_format {show(value)} is not offered by {model.id}; "
                f"use one of {', '.join(model.formats)}"
            )
        return None
    if name == "background":
        if value not in BACKGROUNDS:
            return f"background must be one of {', '.join(BACKGROUNDS)}, not {show(value)}"
        if value == "transparent" and model is not None and not model.transparent_background:
            return f"{model.id} cannot make transparent backgrounds"
        return None
    if name == "moderation":
        if value not in MODERATIONS:
            return f"moderation must be one of {', '.join(MODERATIONS)}, not {show(value)}"
        return None
    raise AssertionError(f"no check for parameter {name}")  # PARAM_FIELDS and this disagree


def combo_problem(params: Mapping[str, Any]) -> tuple[str, str] | None:
    """A conflict between background, output_format and output_compression: (field, why)."""
    fmt = params.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if params.get("background") == "transparent" and fmt not in ALPHA_FORMATS:
        return (
            "background",
            f"a transparent background needs output_format png or webp, not '{fmt}'",
        )
    if "output_compression" in params and fmt not in COMPRESSIBLE_FORMATS:
        return (
            "output_compression",
            f"output_compression applies to jpeg and webp only, not '{fmt}'",
        )
    return None


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not an image reference we can use, or None."""
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key:
            return "an s3 reference must be s3://bucket/key"
        return None
    if ref.startswith("https://"):
        return url_problem(ref, schemes=("https",), max_chars=MAX_REF_URL_CHARS)
    if ref.startswith("data:"):
        if len(ref) > MAX_IMAGE_URL_CHARS:
            return f"a data URL may be at most {MAX_IMAGE_URL_CHARS:,} characters"
        if not _DATA_URL_RE.match(ref):
            return "a data URL must be data:image/<type>;base64,<data>"
        return None
    if ref.startswith("file:///"):
        if len(ref) <= len("file:///"):
            return "a file reference must be file:///absolute/path"
        return None
    if ref.startswith("file-"):
        if not _FILE_ID_RE.match(ref):
            return "an upstream file id looks like file-abc123"
        return None
    return (
        f"{show(ref)} is not an image reference: use s3://bucket/key, https://..., "
        f"data:image/...;base64,..., an upstream file id (file-...), or file:///path"
    )


def url_problem(
    url: str,
    schemes: tuple[str, ...] = ("http", "https"),
    max_chars: int = MAX_WEBHOOK_URL_CHARS,
) -> str | None:
    """Why ``url`` is not a URL with one of ``schemes``, a host and at most ``max_chars``, or None."""
    if len(url) > max_chars:
        return f"the URL may be at most {max_chars:,} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "the URL must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"the URL is malformed: {exc}"
    if parts.scheme not in schemes:
        return f"the URL must start with {' or '.join(s + '://' for s in schemes)}"
    if not host:
        return "the URL has no host"
    return None
