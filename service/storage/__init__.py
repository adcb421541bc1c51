"""Object storage: where requests, images and manifests live, behind one port.

:mod:`service.storage.port` is the interface (:class:`Storage`) and its errors,
:mod:`service.storage.layout` every key imagebatch writes, and :func:`open_storage` picks an
adapter from ``settings.storage_location``:

* ``s3://bucket/prefix`` -> :class:`service.storage.s3.S3Storage` (AWS, MinIO, R2, any endpoint)
* ``file:///path``      -> :class:`service.storage.local.LocalStorage` (a directory)

Vendor exceptions (botocore, OSError) never escape an adapter, so callers never import botocore.
"""

from __future__ import annotations

import urllib.parse

from service.settings import Settings
from service.storage.layout import (
    image_key,
    job_prefix,
    manifest_key,
    request_key,
    request_version_key,
    thumb_key,
)
from service.storage.local import LocalStorage
from service.storage.port import (
    MAX_REF_BYTES,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    ReferenceUnreadable,
    Storage,
    StorageError,
    iter_chunk_lines,
)
from service.storage.s3 import S3Storage

__all__ = [
    "MAX_REF_BYTES",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectTooLarge",
    "ReferenceUnreadable",
    "Storage",
    "StorageError",
    "image_key",
    "iter_chunk_lines",
    "job_prefix",
    "manifest_key",
    "open_storage",
    "request_key",
    "request_version_key",
    "thumb_key",
]


def open_storage(settings: Settings, *, s3_client: object | None = None) -> Storage:
    """The adapter for ``settings.storage_location``.

    Call once per process (in the API's lifespan, in a Celery worker after fork) and pass the
    result down: the S3 adapter holds a boto3 client with its connection pool. ``s3_client``
    lets a caller share a client it already made.
    """
    location = settings.storage_location
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme == "s3":
        return S3Storage.from_settings(settings, client=s3_client)
    if scheme == "file":
        return LocalStorage.from_settings(settings)
    raise ValueError(
        f"IMAGEBATCH_STORAGE_URL {location!r} is not supported: "
        "use s3://bucket/prefix or file:///absolute/path"
    )
