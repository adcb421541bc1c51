"""Object storage: the port every process uses for requests, images and manifests.

This module owns the storage interface (:class:`Storage`), its errors, the object layout
(:func:`image_key`, :func:`request_key`, :func:`manifest_key`) and :func:`open_storage`, which
picks an adapter from ``settings.storage_location``:

* ``s3://bucket/prefix`` -> :class:`service.storage.s3.S3Storage` (AWS, MinIO, R2, any endpoint)
* ``file:///path``      -> :class:`service.storage.local.LocalStorage` (a directory)

Keys are relative (``jobs/{job_id}/images/{item_id}.png``); the adapter applies its prefix or root.
A key with ``..``/``.`` segments, a leading ``/``, a backslash, an empty segment or a NUL is
refused with :class:`ValueError`, so no key can ever escape the prefix or root.

Failure semantics, the same for both adapters:

* :class:`ObjectNotFound` - the object (or reference image) does not exist. Permanent.
* :class:`ObjectTooLarge` - a reference image is over :data:`MAX_REF_BYTES`. Permanent.
* :class:`StorageError` - anything else (unreachable endpoint, missing bucket, access denied,
  disk full, throttling that outlived the client's retries). Callers treat it as transient and
  retry with backoff; the message names the object and the cause. ``exc.transient`` is False
  for the two permanent subclasses above, so ``except StorageError`` retry policies can tell.
* :class:`ValueError` - a caller bug or bad input: an unsafe key, bad metadata, an unsupported URI.

Vendor exceptions (botocore, OSError) never escape an adapter, so callers never import botocore.

Writes are atomic: an object appears under its key complete or not at all, and writing the same
key again is a plain overwrite - callers rely on deterministic keys for idempotency.

Metadata: keys are lower-cased and must match ``[a-z0-9][a-z0-9._-]*``; values are any strings.
S3 carries user metadata in HTTP headers, which only hold ASCII, so the S3 adapter stores values
percent-encoded (space, ``%``, control and non-ASCII characters) and decodes them on ``head``;
both adapters therefore return exactly the strings that were written. The total is capped at
S3's 2 KB.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from service.settings import Settings

# Reference images (edits) larger than this are refused: upstream's own limit for an input image
# is 50 MB, so anything bigger would only fail later and cost a worker its memory.
MAX_REF_BYTES = 50 * 1024 * 1024

# S3's limit on a key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024

# S3's limit on user metadata (keys plus values, as sent).
MAX_METADATA_BYTES = 2048

# The local adapter keeps sidecars and temp files under this top-level directory of its root;
# keys may not start with it on either adapter, so both accept exactly the same keys.
RESERVED_TOP = ".imagebatch-internal"

# Ids that go into keys: the same charset intake allows for item ids.
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EXT_RE = re.compile(r"[a-z0-9]{1,8}")
_META_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


class StorageError(Exception):
    """Storage failed in a way that is transient or unexpected; the message says which object."""

    #: Whether retrying later can help. A task's retry policy should retry only these, and
    #: fail the item at once on the permanent subclasses below.
    transient: bool = True

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFound(StorageError):
    """The object does not exist."""

    transient = False


class ObjectTooLarge(StorageError):
    """The object is larger than the caller may read (a reference image over 50 MB)."""

    transient = False


@dataclass(frozen=True)
class ObjectInfo:
    """What :meth:`Storage.head` and :meth:`Storage.list` report about an object.

    ``key`` is relative to the storage prefix. ``list`` reports only ``key`` and ``size``
    (``content_type`` None, ``metadata`` empty) on both adapters: S3 listings do not carry them,
    and fetching them would cost a request per object. Use ``head`` when they matter.
    """

    key: str
    size: int
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class Storage(Protocol):
    """A bucket-with-prefix or a directory, addressed by relative keys."""

    #: Where the objects live, e.g. ``s3://bucket/prefix`` or ``file:///path``; for logs and
    #: ``/v1/info``. Never contains credentials.
    description: str

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` under ``key`` (atomic; overwrites)."""
        ...

    def put_file(
        self,
        key: str,
        fileobj: BinaryIO,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stream ``fileobj`` (from its current position) to ``key`` without reading it whole
        into memory; S3 switches to a multipart upload above the transfer threshold."""
        ...

    def writer(
        self,
        key: str,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> AbstractContextManager[BinaryIO]:
        """Write a large object incrementally; it is published only if the block exits cleanly.

        On an exception inside the block nothing appears under ``key`` (an earlier version, if
        any, stays) and the exception propagates.
        """
        ...

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A streaming read of the object; raises :class:`ObjectNotFound`."""
        ...

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """The object's lines without their line terminator (``\\n`` or ``\\r\\n``), streamed.

        Memory is bounded by the longest line, not the object. A last line without a newline is
        yielded too; empty lines are yielded as ``b""``. :class:`ObjectNotFound` is raised on the
        first ``next()``.
        """
        ...

    def head(self, key: str) -> ObjectInfo:
        """Size, content type and metadata; raises :class:`ObjectNotFound`."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix, ``""`` for all), in
        key order, fetched lazily page by page."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        ...

    def url(self, key: str) -> str:
        """A URL a caller can GET the object from: presigned on S3 (valid
        ``settings.presign_seconds``), the API's ``/v1/objects/{key}`` route for local storage."""
        ...

    def check(self) -> None:
        """Readiness: raise :class:`StorageError` if the bucket or directory is unusable."""
        ...

    def read_ref(self, uri: str) -> bytes:
        """Read a caller's reference image: ``s3://bucket/key`` (any bucket, this adapter's
        credentials) on S3 storage, ``file:///abs/path`` on local storage.

        Raises :class:`ObjectNotFound`, :class:`ObjectTooLarge` (over :data:`MAX_REF_BYTES`),
        :class:`StorageError`, or :class:`ValueError` for a URI this adapter cannot read.
        """
        ...


# --- the layout: every key imagebatch writes ------------------------------------------------


def job_prefix(job_id: str) -> str:
    """Everything a job stored lives under this prefix."""
    return f"jobs/{_checked_id('job_id', job_id)}/"


def request_key(job_id: str) -> str:
    """The job's request as accepted at intake, one item per line."""
    return f"{job_prefix(job_id)}request.jsonl"


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


def _checked_id(name: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


# --- shared checks and helpers for the adapters ---------------------------------------------


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`ValueError`."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    _check_path_like(key, what="key")
    if key.endswith("/"):
        raise ValueError(f"storage key {key!r} must not end with '/'")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key` for a listing prefix: ``""`` and a trailing ``/`` are allowed."""
    if not isinstance(prefix, str):
        raise ValueError("storage prefix must be a string")
    if prefix:
        # "jobs/" is checked as "jobs"; "/" alone stays "/" and is refused as absolute.
        _check_path_like(
            prefix[:-1] if len(prefix) > 1 and prefix.endswith("/") else prefix, what="prefix"
        )
    return prefix


def _check_path_like(value: str, *, what: str) -> None:
    if value.startswith("/"):
        raise ValueError(f"storage {what} {value!r} must be relative (no leading '/')")
    if "\\" in value or "\x00" in value:
        raise ValueError(f"storage {what} {value!r} must not contain a backslash or NUL")
    segments = value.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise ValueError(
                f"storage {what} {value!r} must not contain empty, '.' or '..' segments"
            )
    if segments[0] == RESERVED_TOP:
        raise ValueError(f"storage {what} {value!r} uses the reserved name {RESERVED_TOP!r}")
    if len(value.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"storage {what} is longer than {MAX_KEY_BYTES} bytes")


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Lower-case and validate metadata keys; return a plain dict (see the module docstring)."""
    out: dict[str, str] = {}
    for raw_key, value in (metadata or {}).items():
        key = raw_key.lower()
        if not _META_KEY_RE.fullmatch(key) or not key.isascii():
            raise ValueError(
                f"metadata key {raw_key!r} must be ASCII letters, digits, '.', '_' or '-'"
            )
        if not isinstance(value, str):
            raise ValueError(f"metadata value for {raw_key!r} must be a string")
        if key in out:
            raise ValueError(f"metadata key {raw_key!r} is given twice (keys are case-insensitive)")
        out[key] = value
    size = sum(len(k) + len(encode_meta_value(v)) for k, v in out.items())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes encoded; the limit is {MAX_METADATA_BYTES}")
    return out


# Printable ASCII except space (HTTP trims it at the ends) and '%' (the escape itself).
_META_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def encode_meta_value(value: str) -> str:
    """An HTTP-header-safe ASCII form of a metadata value; :func:`decode_meta_value` inverts it."""
    return urllib.parse.quote(value, safe=_META_SAFE)


def decode_meta_value(value: str) -> str:
    return urllib.parse.unquote(value)


def iter_stream_lines(stream: BinaryIO, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
    """Split a byte stream into lines (terminator removed); see :func:`iter_chunk_lines`."""
    return iter_chunk_lines(iter(lambda: stream.read(chunk_size), b""))


def iter_chunk_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split byte chunks into lines (terminator removed) holding at most one line plus one
    chunk in memory. A long line is gathered as a list of pieces and joined once, so a line of
    many MB costs one copy, not one per chunk. Used for storage objects and upstream files."""
    pieces: list[bytes] = []
    for chunk in chunks:
        if not chunk:
            continue
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if start < len(chunk):
                    pieces.append(chunk[start:])
                break
            if pieces:
                pieces.append(chunk[start:nl])
                line = b"".join(pieces)
                pieces = []
            else:
                line = chunk[start:nl]
            yield line[:-1] if line.endswith(b"\r") else line
            start = nl + 1
    if pieces:
        line = b"".join(pieces)
        yield line[:-1] if line.endswith(b"\r") else line


def read_capped(stream: BinaryIO, cap: int, *, what: str) -> bytes:
    """Read the whole stream, refusing more than ``cap`` bytes with :class:`ObjectTooLarge`."""
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise ObjectTooLarge(f"{what} is larger than {cap // (1024 * 1024)} MB", key=what)
    return bytes(data)


# --- choosing an adapter ---------------------------------------------------------------------


def open_storage(settings: Settings, *, s3_client: object | None = None) -> Storage:
    """The adapter for ``settings.storage_location``.

    Call once per process (in the API's lifespan, in a Celery worker after fork) and pass the
    result down: the S3 adapter holds a boto3 client with its connection pool. ``s3_client``
    lets a caller share a client it already made.
    """
    location = settings.storage_location
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme == "s3":
        from service.storage.s3 import S3Storage

        return S3Storage.from_settings(settings, client=s3_client)
    if scheme == "file":
        from service.storage.local import LocalStorage

        return LocalStorage.from_settings(settings)
    raise ValueError(
        f"IMAGEBATCH_STORAGE_URL {location!r} is not supported: "
        "use s3://bucket/prefix or file:///absolute/path"
    )
