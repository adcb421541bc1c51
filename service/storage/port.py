"""The storage port: the interface both adapters implement, its errors, and their shared checks.

Keys are relative (``jobs/{job_id}/images/{item_id}.png``); the adapter applies its prefix or root.
A key with ``..``/``.`` segments, a leading ``/``, a backslash, an empty segment or a NUL is
refused with :class:`ValueError`, so no key can ever escape the prefix or root.

Failure semantics, the same for both adapters:

* :class:`ObjectNotFound` - the object (or reference image) does not exist. Permanent.
* :class:`ObjectTooLarge` - a reference image is over :data:`MAX_REF_BYTES`. Permanent.
* :class:`ReferenceUnreadable` - a caller's reference image cannot be read with our credentials:
  access denied, no such bucket (or no such key). Permanent: a retry reads it no better.
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

import builtins
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

from service.errors import ImagebatchError

if TYPE_CHECKING:
    pass

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

_META_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


class StorageError(ImagebatchError):
    """Storage failed in a way that is transient or unexpected; the message says which object."""

    #: Whether retrying later can help. A task's retry policy retries only these, and fails the
    #: item at once on the permanent subclasses below.
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


class ReferenceUnreadable(StorageError):
    """A caller's reference image that storage refuses to give us (denied, no such bucket)."""

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
        sha256: str | None = None,
    ) -> None:
        """Store ``data`` under ``key`` (atomic; overwrites).

        ``sha256`` is the hex SHA-256 of ``data`` when the caller has computed it: an adapter
        may send it for the server to check the body against, instead of hashing it again."""
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

    def open_from(self, key: str, offset: int) -> AbstractContextManager[BinaryIO]:
        """A streaming read of the object from byte ``offset`` on (a ranged GET on S3); an
        offset at or past the end reads nothing. Raises :class:`ObjectNotFound`."""
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

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy an object to another key of this storage, content type and metadata included.

        S3 copies server-side (no bytes pass through us); a local directory makes a hard link
        (or a plain copy where the filesystem cannot link). Atomic like a write, and overwrites
        ``dst_key``. Raises :class:`ObjectNotFound` when ``src_key`` does not exist: callers
        rely on it to tell a vanished object from a copied one.
        """
        ...

    def copy_many(self, pairs: Sequence[tuple[str, str]]) -> builtins.list[StorageError | None]:
        """:meth:`copy` for many ``(src_key, dst_key)`` pairs, all durable when it returns: for
        each pair None (copied) or the error it met (:class:`ObjectNotFound` for a vanished
        source). Much faster than a loop of :meth:`copy`: a local directory is synced once for
        all the links made in it, and S3 copies run in parallel. ``ValueError`` (an unsafe key)
        is raised, not returned."""
        ...

    def url(self, key: str) -> str:
        """A URL a caller can GET the object from: presigned on S3 (valid
        ``settings.presign_seconds``), the API's ``/v1/objects/{key}`` route for local storage."""
        ...

    def check(self) -> None:
        """Readiness: raise :class:`StorageError` if the bucket or directory is unusable."""
        ...

    def sweep_temp(self, older_than: float) -> int:
        """Remove what writes that never finished left behind (a process killed mid-write),
        begun more than ``older_than`` seconds ago: temp files of local storage, incomplete
        multipart uploads on S3. Returns how many were removed. Nothing that old is still being
        written: the caller passes the longest time a task may run."""
        ...

    def read_ref(self, uri: str) -> bytes:
        """Read a caller's reference image: ``s3://bucket/key`` (any bucket, this adapter's
        credentials) on S3 storage, ``file:///abs/path`` on local storage.

        Raises :class:`ObjectNotFound`, :class:`ObjectTooLarge` (over :data:`MAX_REF_BYTES`),
        :class:`StorageError`, or :class:`ValueError` for a URI this adapter cannot read.
        """
        ...


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
