"""The image request parameters and image references of a job: is this value acceptable?

Owns the checks of one value at a time against the job's model (size, quality, output_format,
n, background, output_compression, moderation), the conflicts between background, output_format
and output_compression, the shape of an image reference or a URL (the webhook, an https
reference), and where a tenant's references may point (:class:`JobScope`): the reference prefixes
it was given, upstream file ids if it may use them, and the images of its own jobs, never the
rest of imagebatch's storage; and whether its webhook may be used.

Failure semantics: each check returns why a value is refused as a message (``None`` when it is
acceptable) and never raises for any input; the caller files the message under the field's path.
The only exception is an ``AssertionError`` for a parameter name this module has no check for,
which means ``PARAM_FIELDS`` and :func:`param_problem` disagree (a bug, not bad input).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    MAX_IMAGES,
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
        if len(ref) > MAX_REF_URL_CHARS:
            return f"an s3 reference may be at most {MAX_REF_URL_CHARS:,} characters"
        return _path_problem(key, "s3 key")
    if ref.startswith("https://"):
        problem = url_problem(ref, schemes=("https",), max_chars=MAX_REF_URL_CHARS)
        if problem is None and "@" in urlsplit(ref).netloc:
            problem = "a reference URL must not carry a user name or password"
        return problem or _path_problem(urlsplit(ref).path.lstrip("/"), "URL path")
    if ref.startswith("data:"):
        if len(ref) > MAX_IMAGE_URL_CHARS:
            return f"a data URL may be at most {MAX_IMAGE_URL_CHARS:,} characters"
        if not _DATA_URL_RE.match(ref):
            return "a data URL must be data:image/<type>;base64,<data>"
        return None
    if ref.startswith("file:///"):
        if len(ref) <= len("file:///"):
            return "a file reference must be file:///absolute/path"
        if len(ref) > MAX_REF_URL_CHARS:
            return f"a file reference may be at most {MAX_REF_URL_CHARS:,} characters"
        return _path_problem(urllib.parse.unquote(urlsplit(ref).path).lstrip("/"), "path")
    if ref.startswith("file-"):
        if not _FILE_ID_RE.match(ref):
            return "an upstream file id looks like file-abc123"
        return None
    return (
        f"{show(ref)} is not an image reference: use s3://bucket/key, https://..., "
        f"data:image/...;base64,..., an upstream file id (file-...), or file:///path"
    )


def ref_check(raw: Any, scope: JobScope | None) -> str | None:
    """Why ``raw`` is not a reference this job may use (its shape, then the tenant's scope)."""
    if not isinstance(raw, str):
        return f"an image reference must be a string, not {json_type(raw)}"
    problem = ref_problem(raw)
    if problem is None and scope is not None:
        problem = scope.problem(raw)
    return problem


def images_check(raw: Any, scope: JobScope | None) -> tuple[list[str] | None, str, str]:
    """An item's ``images``: (the references, "", "") or (None, the sub-path at fault, why)."""
    if not isinstance(raw, list):
        kind = json_type(raw)
        return None, "", f"images must be an array of 1 to {MAX_IMAGES} references, not {kind}"
    if not 1 <= len(raw) <= MAX_IMAGES:
        return None, "", f"images must hold 1 to {MAX_IMAGES} references, got {len(raw)}"
    for k, ref in enumerate(raw):
        problem = ref_check(ref, scope)
        if problem is not None:
            return None, f"[{k}]", problem
    return list(raw), "", ""


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


# Percent-escapes that would let a path mean something else to the server than to a prefix check:
# an encoded dot, slash or backslash.
_SNEAKY_ESCAPE_RE = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def _path_problem(path: str, what: str) -> str | None:
    """Why a reference's path could escape a prefix ('.' or '..' segments, sneaky escapes)."""
    if "\\" in path or "\x00" in path:
        return f"the {what} must not contain a backslash or NUL"
    if any(seg in (".", "..") for seg in path.split("/")):
        return f"the {what} must not contain '.' or '..' segments"
    if _SNEAKY_ESCAPE_RE.search(path):
        return f"the {what} must not contain percent-encoded dots, slashes or backslashes"
    return None


# --------------------------------------------------------------------------------------------
# Where references may point


@dataclass(frozen=True, slots=True)
class RefPrefix:
    """A place references may come from: a bucket or folder, a site or folder, a directory.

    ``authority`` is the bucket (s3), the lower-case ``host[:port]`` (https) or "" (file);
    ``path`` is "" (all of it) or a folder ending in "/": a prefix matches whole path segments,
    so ``s3://cat/a`` allows ``s3://cat/a/x.png`` and never ``s3://cat/ab/x.png``.
    """

    scheme: str
    authority: str
    path: str
    text: str

    def covers(self, scheme: str, authority: str, path: str) -> bool:
        return scheme == self.scheme and authority == self.authority and path.startswith(self.path)


def parse_ref_prefix(text: str) -> RefPrefix:
    """A configured reference prefix; ValueError says what is wrong with it."""
    if not isinstance(text, str) or not text.startswith(("s3://", "https://", "file:///")):
        raise ValueError(
            f"{text!r} is not a reference prefix: use s3://bucket/folder/, "
            "https://host/folder/ or file:///directory/"
        )
    base = text if text.endswith("/") else text + "/"
    problem = ref_problem(base + "x")
    where = _place(base)
    if problem is None and (where is None or (where[0] != "file" and not where[1])):
        problem = "it names no bucket or host"
    if problem is not None or where is None:
        raise ValueError(f"{text!r} is not a reference prefix: {problem}")
    return RefPrefix(*where, text)


def _place(ref: str) -> tuple[str, str, str] | None:
    """(scheme, authority, path) of an s3, https or file reference, as a prefix compares it."""
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        return "s3", bucket, key
    if ref.startswith("https://"):
        parts = urlsplit(ref)
        host = parts.hostname or ""
        try:
            port = parts.port
        except ValueError:
            return None
        authority = host if port in (None, 443) else f"{host}:{port}"
        return "https", authority, parts.path.lstrip("/")
    if ref.startswith("file:///"):
        return "file", "", urllib.parse.unquote(urlsplit(ref).path).lstrip("/")
    return None


@dataclass(frozen=True)
class JobScope:
    """Where one tenant's job may point: its reference images and its webhook.

    ``storage`` is imagebatch's own storage location: a reference inside it is allowed only
    when it is an image of one of the tenant's own jobs (``owns_job``), whatever the prefixes
    say, so no tenant reaches another's images, requests or manifests. ``webhook`` says why a
    webhook URL may not be used (its address, no signing secret), or None.
    """

    prefixes: tuple[RefPrefix, ...] = ()
    file_ids: bool = False
    storage: RefPrefix | None = None
    owns_job: Callable[[str], bool] | None = None
    webhook: Callable[[str], str | None] | None = None

    def problem(self, ref: str) -> str | None:
        """Why this tenant may not use ``ref`` (already well-formed), or None."""
        if ref.startswith("data:"):
            return None
        if ref.startswith("file-"):
            if self.file_ids:
                return None
            return "upstream file ids (file-...) are not enabled for this tenant"
        where = _place(ref)
        if where is None:
            return "this reference cannot be checked against the allowed prefixes"
        if self.storage is not None and self.storage.covers(*where):
            return self._own_image_problem(where[2][len(self.storage.path) :])
        if any(p.covers(*where) for p in self.prefixes):
            return None
        if not self.prefixes:
            return (
                "no reference prefixes are configured for this tenant: only data: URLs and "
                "images of its own jobs may be used"
            )
        allowed = ", ".join(p.text for p in self.prefixes[:8])
        return f"the reference is outside the prefixes this tenant may use ({allowed})"

    def own_image_key(self, ref: str) -> str | None:
        """The storage key of ``ref`` when it is inside imagebatch's storage, else None."""
        where = _place(ref)
        if where is None or self.storage is None or not self.storage.covers(*where):
            return None
        return where[2][len(self.storage.path) :]

    def _own_image_problem(self, key: str) -> str | None:
        parts = key.split("/")
        image = len(parts) == 4 and parts[0] == "jobs" and parts[2] == "images" and parts[3]
        if image and self.owns_job is not None and self.owns_job(parts[1]):
            return None
        return (
            "the reference is in imagebatch's own storage: only images of this tenant's own "
            "jobs (.../jobs/<job id>/images/<file>) may be used"
        )


def storage_prefix(location: str) -> RefPrefix | None:
    """imagebatch's storage location (``s3://bucket/prefix`` or ``file:///dir``) as a prefix."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        prefix = prefix.strip("/")
        return RefPrefix("s3", bucket, f"{prefix}/" if prefix else "", location)
    where = _place(location.rstrip("/") + "/") if location.startswith("file:///") else None
    if where is None:
        return None
    return RefPrefix(*where, location)
