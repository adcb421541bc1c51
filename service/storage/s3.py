"""The S3 adapter of :class:`service.storage.Storage` (AWS, MinIO, R2, any S3 endpoint).

Owns the boto3 client (one per adapter, so one per process: its connection pool is shared by
every thread) and the translation of botocore/boto3 errors into :mod:`service.storage` errors:

* ``NoSuchKey`` / ``404`` -> :class:`ObjectNotFound`
* ``NoSuchBucket``        -> :class:`StorageError` naming the bucket
* ``AccessDenied`` / 403, rejected or missing credentials -> :class:`StorageError` saying so
* reading a caller's reference (:meth:`S3Storage.read_ref`): ``AccessDenied`` and
  ``NoSuchBucket`` -> :class:`ReferenceUnreadable`, permanent (our own bucket stays transient:
  a permission being fixed is worth waiting for; someone else's bucket is not)
* connection failures and timeouts -> :class:`StorageError` naming the endpoint
* anything else from botocore -> :class:`StorageError` with S3's code and message

Throttling (``SlowDown``, 503) and connection resets are retried inside botocore ("standard"
retry mode, 5 attempts with jittered backoff) before they surface as :class:`StorageError`.

Endpoint, region and credentials resolve the boto3 way: ``IMAGEBATCH_S3_ENDPOINT_URL`` when set,
else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS; ``AWS_*`` credentials, profiles,
instance roles. S3-compatible servers that reject boto3's default CRC checksums can be served by
setting ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (left to boto3, so that env var works).

Images carry their SHA-256 (computed anyway for their metadata) as ``x-amz-checksum-sha256``,
a signed header S3 checks the body against (``BadDigest`` if they differ). Those puts go through
a second client that does not hash the body again to sign it (``UNSIGNED-PAYLOAD``, which
botocore already sends over HTTPS once a checksum is present; this does the same over plain
HTTP), and botocore computes no CRC32 for them: one pass over each image instead of three. With
``when_required`` no checksum is sent and the signature covers the body, as before.
"""

from __future__ import annotations

import base64
import builtins
import io
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from service.storage.port import (
    MAX_REF_BYTES,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    ReferenceUnreadable,
    StorageError,
    check_key,
    check_metadata,
    check_prefix,
    decode_meta_value,
    encode_meta_value,
    iter_stream_lines,
    read_capped,
)

if TYPE_CHECKING:
    from service.settings import Settings

# What botocore and boto3 raise; nothing outside this module sees them.
_VENDOR_ERRORS = (ClientError, BotoCoreError, Boto3Error)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}

# A writer() spools this much in memory before moving to a temp file on disk.
_SPOOL_MEMORY_BYTES = 1024 * 1024


# Streams above 8 MiB go up as a multipart upload of 8 MiB parts, 4 in flight. s3transfer
# reads each part into memory; capping parts held at 4 (its default is 10) bounds an upload at
# about (4 + 1) x 8 MiB = 40 MiB (measured) whatever the object's size, while a big manifest
# still uploads in parallel. "classic" pins s3transfer (not CRT) so the behaviour does not depend
# on what else is installed.
def transfer_config(
    *, part_bytes: int = 8 * 1024 * 1024, concurrency: int = 4, parts_in_memory: int = 4
) -> TransferConfig:
    config = TransferConfig(
        multipart_threshold=part_bytes,
        multipart_chunksize=part_bytes,
        max_concurrency=concurrency,
        preferred_transfer_client="classic",
    )
    # Not a constructor argument of boto3's TransferConfig, but read by s3transfer's manager.
    config.max_in_memory_upload_chunks = parts_in_memory
    return config


DEFAULT_TRANSFER = transfer_config()


def make_s3_client(settings: Settings, *, sign_payload: bool | None = None) -> Any:
    """The one boto3 S3 client of a process, configured from settings.

    ``sign_payload=False`` makes the client for bodies that carry their own SHA-256 checksum
    (:meth:`S3Storage.put_bytes`): S3 checks the body against that signed header, so the
    signature need not hash the body a second time. ``None`` leaves it to botocore (hashed over
    plain HTTP; over HTTPS not, once a checksum is present)."""
    s3: dict[str, Any] = {"addressing_style": "path" if settings.s3_path_style else "auto"}
    if sign_payload is not None:
        s3["payload_signing_enabled"] = sign_payload
    config = Config(
        s3=s3,
        retries={"mode": "standard", "total_max_attempts": 5},
        # Enough connections for a collect uploading images from many threads at once.
        max_pool_connections=32,
        # Fail fast on an unreachable endpoint (readiness probes); reads of big objects may be slow.
        connect_timeout=5,
        read_timeout=60,
        signature_version="s3v4",
    )
    # A session of our own: boto3's module-level default session is not thread-safe.
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,  # None lets boto3 read AWS_ENDPOINT_URL_S3 etc.
        region_name=settings.s3_region,
        config=config,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/parts`` -> ``(bucket, "key/parts")``; the key is taken literally."""
    if not uri.lower().startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket: use s3://bucket/key")
    return bucket, key


class S3Storage:
    """Objects under ``s3://bucket/prefix/``."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        presign_seconds: int = 3600,
        transfer_config: TransferConfig | None = None,
        checked_client: Any | None = None,
    ) -> None:
        self.client = client
        # Bodies whose SHA-256 goes along as x-amz-checksum-sha256 (put_bytes with sha256): sent
        # through checked_client when there is one (see make_s3_client). Not when checksums are
        # turned down (AWS_REQUEST_CHECKSUM_CALCULATION=when_required): the server may refuse them.
        self._checksums = client.meta.config.request_checksum_calculation != "when_required"
        self._checked_client = checked_client or client
        self.bucket = bucket
        prefix = prefix.strip("/")
        if prefix:
            check_prefix(prefix)
        self._prefix = f"{prefix}/" if prefix else ""
        self.presign_seconds = presign_seconds
        self.transfer_config = transfer_config or DEFAULT_TRANSFER
        # Keys per list_objects_v2 page (S3's maximum); pages are fetched as the caller iterates.
        self.list_page_size = 1000
        self.description = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    @classmethod
    def from_settings(cls, settings: Settings, *, client: Any | None = None) -> S3Storage:
        bucket, prefix = parse_s3_uri(settings.storage_location)
        return cls(
            client if client is not None else make_s3_client(settings),
            bucket,
            prefix,
            presign_seconds=settings.presign_seconds,
            checked_client=None
            if client is not None
            else make_s3_client(settings, sign_payload=False),
        )

    # --- writing -------------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> None:
        full = self._full(key)
        extra = self._extra_args(content_type, metadata)
        client = self.client
        if sha256 and self._checksums:
            # S3 checks the body against it (BadDigest if it differs), and botocore computes no
            # CRC32 of its own; the checked client does not hash the body again to sign it.
            extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256)).decode()
            client = self._checked_client
        try:
            client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "write", key) from exc

    def put_file(
        self,
        key: str,
        fileobj: BinaryIO,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        full = self._full(key)
        extra = self._extra_args(content_type, metadata)
        self._upload(key, full, fileobj, extra)

    @contextmanager
    def writer(
        self,
        key: str,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[BinaryIO]:
        full = self._full(key)
        extra = self._extra_args(content_type, metadata)
        # Spool locally, upload once complete: S3 has no "append", and a multipart upload left
        # open by a crashed writer would linger (and bill) until a lifecycle rule removed it.
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES) as spool:
            yield cast(BinaryIO, spool)
            spool.seek(0)
            self._upload(key, full, cast(BinaryIO, spool), extra)

    def _upload(self, key: str, full: str, fileobj: BinaryIO, extra: dict[str, Any]) -> None:
        try:
            self.client.upload_fileobj(
                fileobj, self.bucket, full, ExtraArgs=extra, Config=self.transfer_config
            )
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "write", key) from exc

    def _extra_args(self, content_type: str, metadata: Mapping[str, str] | None) -> dict[str, Any]:
        if not content_type:
            raise ValueError("content_type is required")
        meta = {k: encode_meta_value(v) for k, v in check_metadata(metadata).items()}
        return {"ContentType": content_type, "Metadata": meta}

    # --- reading -------------------------------------------------------------------------------

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        full = self._full(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "read", key) from exc
        try:
            yield cast(BinaryIO, body)
        except _VENDOR_ERRORS as exc:
            # The body raises botocore errors (read timeout, connection reset) mid-stream.
            raise self._error(exc, "read", key) from exc
        finally:
            body.close()

    @contextmanager
    def open_from(self, key: str, offset: int) -> Iterator[BinaryIO]:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if offset == 0:
            with self.open(key) as body:
                yield body
            return
        full = self._full(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={offset}-")[
                "Body"
            ]
        except ClientError as exc:
            if _code(exc) != "InvalidRange":
                raise self._error(exc, "read", key) from exc
            # Past the end (S3 answers 416): nothing to read, as a seek past the end of a file.
            yield cast(BinaryIO, io.BytesIO())
            return
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "read", key) from exc
        try:
            yield cast(BinaryIO, body)
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "read", key) from exc
        finally:
            body.close()

    def iter_lines(self, key: str) -> Iterator[bytes]:
        with self.open(key) as body:
            yield from iter_stream_lines(body)

    def head(self, key: str) -> ObjectInfo:
        full = self._full(key)
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=full)
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "head", key) from exc
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            content_type=resp.get("ContentType"),
            metadata={k: decode_meta_value(v) for k, v in resp.get("Metadata", {}).items()},
        )

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        cut = len(self._prefix)
        try:
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=self._prefix + prefix,
                PaginationConfig={"PageSize": self.list_page_size},
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(key=obj["Key"][cut:], size=int(obj["Size"]))
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "list", prefix) from exc

    def sweep_temp(self, older_than: float) -> int:
        """Abort multipart uploads under the prefix begun more than ``older_than`` s ago."""
        cutoff = time.time() - older_than
        removed = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._prefix
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed += 1
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "sweep temporary uploads under", self._prefix or "/") from exc
        return removed

    def delete(self, key: str) -> None:
        full = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "delete", key) from exc

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dst = self._full(src_key), self._full(dst_key)
        try:
            # One request, server-side, metadata and content type kept. CopyObject takes objects
            # up to 5 GB; images are far below that.
            self.client.copy_object(
                Bucket=self.bucket,
                Key=dst,
                CopySource={"Bucket": self.bucket, "Key": src},
                MetadataDirective="COPY",
            )
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "copy", src_key) from exc

    def copy_many(self, pairs: Sequence[tuple[str, str]]) -> builtins.list[StorageError | None]:
        for src_key, dst_key in pairs:
            self._full(src_key), self._full(dst_key)  # unsafe keys raise before anything is copied

        def one(pair: tuple[str, str]) -> StorageError | None:
            try:
                self.copy(*pair)
            except StorageError as exc:
                return exc
            return None

        if len(pairs) <= 1:
            return [one(p) for p in pairs]
        # Each copy is one request that waits on S3; the client's pool holds 32 connections.
        with ThreadPoolExecutor(max_workers=min(16, len(pairs))) as pool:
            return list(pool.map(one, pairs))

    def url(self, key: str) -> str:
        full = self._full(key)
        try:
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": full},
                    ExpiresIn=self.presign_seconds,
                )
            )
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "presign", key) from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # head_bucket has no body, so a missing bucket is a bare 404.
            if _code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist at {self._endpoint()}: "
                    "create it or fix IMAGEBATCH_STORAGE_URL"
                ) from exc
            raise self._error(exc, "check", None) from exc
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "check", None) from exc

    def read_ref(self, uri: str) -> bytes:
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme != "s3":
            raise ValueError(
                f"reference image {uri!r}: only s3://bucket/key references work with S3 storage"
            )
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise ValueError(f"reference image {uri!r} has no key: use s3://bucket/key")
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = _code(exc)
            if code in _DENIED or code == "NoSuchBucket":
                why = "access denied" if code in _DENIED else f"bucket {bucket!r} does not exist"
                raise ReferenceUnreadable(f"reference image {uri}: {why}", key=uri) from exc
            raise self._error(exc, "read", None, where=uri, bucket=bucket) from exc
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "read", None, where=uri, bucket=bucket) from exc
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", 0)) > MAX_REF_BYTES:
                raise ObjectTooLarge(
                    f"reference image {uri} is {int(resp['ContentLength']) / 1e6:.1f} MB; "
                    f"the limit is {MAX_REF_BYTES // (1024 * 1024)} MB",
                    key=uri,
                )
            return read_capped(cast(BinaryIO, body), MAX_REF_BYTES, what=f"reference image {uri}")
        except _VENDOR_ERRORS as exc:
            raise self._error(exc, "read", None, where=uri, bucket=bucket) from exc
        finally:
            body.close()

    # --- helpers -------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _error(
        self,
        exc: BaseException,
        action: str,
        key: str | None,
        *,
        where: str | None = None,
        bucket: str | None = None,
    ) -> StorageError:
        """Our error for a vendor one; the message names the object and the cause."""
        bucket = bucket or self.bucket
        if where is None:
            where = f"s3://{bucket}/{self._prefix}{key}" if key is not None else self.description
        # boto3's upload wraps the ClientError into S3UploadFailedError; look through it.
        cause: BaseException = exc
        if not isinstance(exc, ClientError | BotoCoreError):
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, ClientError | BotoCoreError):
                cause = inner
        if isinstance(cause, ClientError):
            code = _code(cause)
            message = cause.response.get("Error", {}).get("Message") or ""
            if code in _NOT_FOUND:
                return ObjectNotFound(f"{where} does not exist", key=key)
            if code == "NoSuchBucket":
                return StorageError(
                    f"cannot {action} {where}: bucket {bucket!r} does not exist", key=key
                )
            if code in _DENIED:
                return StorageError(
                    f"cannot {action} {where}: access denied by S3; check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_PROFILE / role) and the bucket policy",
                    key=key,
                )
            if code in _BAD_CREDENTIALS:
                return StorageError(
                    f"cannot {action} {where}: S3 rejected the credentials ({code})", key=key
                )
            return StorageError(
                f"cannot {action} {where}: S3 error {code}{': ' + message if message else ''}",
                key=key,
            )
        if isinstance(cause, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"cannot {action} {where}: no usable AWS credentials found (set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use a role)",
                key=key,
            )
        if isinstance(cause, BotoConnectionError):
            return StorageError(
                f"cannot {action} {where}: S3 endpoint {self._endpoint()} unreachable: {cause}",
                key=key,
            )
        return StorageError(f"cannot {action} {where}: {cause}", key=key)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
