"""The local-directory adapter of :class:`service.storage.Storage` (the default, for one machine).

Layout under the root directory::

    {root}/{key}                                    the object, e.g. jobs/j1/images/sku-1.png
    {root}/.imagebatch-internal/meta/{key}.json     its metadata where there are no user xattrs
    {root}/.imagebatch-internal/tmp/                files being written

Objects sit under their plain keys so the directory can be browsed and copied as is. An object's
content type and metadata travel with it in its extended attribute ``user.imagebatch``, set
before the temp file is fsynced (one file, one fsync, one rename; links and renames keep it).
Without user xattrs (or for a value too large for them) they go to a sidecar in a tree of its
own, which no key can collide with; ``head`` reads the attribute, then the sidecar (older objects
have one). Every write goes to a temp file on the same filesystem, is fsynced, and is moved into
place with ``os.replace``: a crash leaves either the old object or the new one, never half of
one (at worst an orphan temp file under ``tmp/``). A write returns once its rename is durable
(its directory synced); threads writing into one directory share those syncs. A sidecar is
replaced just before its object, so a visible object always has its metadata.

Unlike S3, a directory cannot hold both ``a`` and ``a/b``; writing the second raises
:class:`StorageError`. imagebatch's own layout never does that.

``OSError`` is translated: a missing file -> :class:`ObjectNotFound`, anything else ->
:class:`StorageError` naming the path and the cause. Errors raised by the caller's own code
inside a ``writer()`` block propagate unchanged (and nothing is published).

``read_ref`` reads ``file://`` references from anywhere the process can unless ``ref_roots``
limits it: like warehouse's LocalFileStorage it trusts its callers (one machine; S3 otherwise).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import mimetypes
import os
import shutil
import stat
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from service.storage.durable import DIR_SYNC, DirectWrites
from service.storage.port import (
    MAX_REF_BYTES,
    RESERVED_TOP,
    ObjectInfo,
    ObjectNotFound,
    ObjectTooLarge,
    ReferenceUnreadable,
    StorageError,
    check_key,
    check_metadata,
    check_prefix,
    iter_stream_lines,
    read_capped,
)

if TYPE_CHECKING:
    from service.settings import Settings

_NOT_FOUND_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)

# The extended attribute holding an object's content type and metadata (the sidecar's JSON).
XATTR = "user.imagebatch"
# A filesystem without user xattrs: every object gets a sidecar instead.
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
# A value this filesystem cannot hold (ext4: one block for all of an inode's attributes): this
# object gets a sidecar instead.
_XATTR_TOO_BIG = {errno.E2BIG, errno.ERANGE, errno.ENOSPC}


def path_from_file_url(url: str) -> Path:
    """``file:///abs/path`` (percent-encoded, as ``Path.as_uri()`` makes it) -> ``Path``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ValueError(f"{url!r} is not a file:// URL")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r} names host {parts.netloc!r}; only local paths work")
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_absolute() or not parts.path:
        raise ValueError(f"{url!r} must be an absolute path: file:///absolute/path")
    return path


def _read_xattr(path: Path) -> bytes | None:
    """An object's metadata from its extended attribute; None where it has none."""
    if not hasattr(os, "getxattr"):
        return None
    try:
        return os.getxattr(path, XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *_NO_XATTRS):
            return None
        raise


class LocalStorage:
    """Objects in a directory."""

    def __init__(
        self,
        root: Path,
        *,
        public_url: str = "http://127.0.0.1:8000",
        ref_roots: Sequence[Path] | None = None,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.description = self.root.as_uri()
        self.public_url = public_url.rstrip("/")
        self._meta = self.root / RESERVED_TOP / "meta"
        self._tmp = self.root / RESERVED_TOP / "tmp"
        # Until the filesystem says it has none (os.setxattr exists on Linux only).
        self._xattrs = hasattr(os, "setxattr")
        self._direct = DirectWrites()  # until the filesystem refuses direct I/O
        # None trusts the caller with any path; a list (even empty) allows only what is under it.
        self._ref_roots = (
            [Path(os.path.realpath(r)) for r in ref_roots] if ref_roots is not None else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        return cls(
            path_from_file_url(settings.storage_location),
            public_url=settings.public_url,
            ref_roots=settings.local_ref_roots,
        )

    # --- writing -------------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,  # a local file has no one to check it
    ) -> None:
        try:
            with self._staged(key, content_type, metadata, direct=True) as f:
                self._direct.write(f.fileno(), data)
        except OSError as exc:
            raise self._error(exc, "write", key) from exc

    def put_file(
        self,
        key: str,
        fileobj: BinaryIO,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        try:
            with self._staged(key, content_type, metadata) as f:
                while chunk := fileobj.read(1024 * 1024):
                    f.write(chunk)
        except OSError as exc:
            raise self._error(exc, "write", key) from exc

    @contextmanager
    def writer(
        self,
        key: str,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[BinaryIO]:
        with self._staged(key, content_type, metadata) as f:
            yield f

    @contextmanager
    def _staged(
        self,
        key: str,
        content_type: str,
        metadata: Mapping[str, str] | None,
        *,
        direct: bool = False,
    ) -> Iterator[BinaryIO]:
        """A temp file that becomes ``key`` (with its sidecar) if the block exits cleanly.

        ``direct``: an unbuffered file for :meth:`DirectWrites.write` (whole objects in hand).
        """
        check_key(key)
        if not content_type:
            raise ValueError("content_type is required")
        meta = check_metadata(metadata)
        try:
            tmp = self._new_tmp()
            # Closed below on every path.
            target = self._direct.open(tmp) if direct else tmp
            f: BinaryIO = open(target, "wb", buffering=0 if direct else -1)  # noqa: SIM115
        except OSError as exc:
            raise self._error(exc, "write", key) from exc
        try:
            yield f
        except BaseException:
            # The caller's block failed: publish nothing, let its exception through unchanged.
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            sidecar = json.dumps({"content_type": content_type, "metadata": meta}).encode()
            try:
                f.flush()
                attached = self._attach(f.fileno(), sidecar)
                os.fsync(f.fileno())
            finally:
                f.close()
            if not attached:
                self._replace_bytes(self._sidecar(key), sidecar)
            self._publish(tmp, self._path(key))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._error(exc, "write", key) from exc
            raise

    def sweep_temp(self, older_than: float) -> int:
        # Aged by the clock that stamps files (a new one's mtime): the process's may differ.
        probe = self._new_tmp()
        try:
            cutoff = probe.stat().st_mtime - older_than
            entries = list(os.scandir(self._tmp))
        finally:
            probe.unlink(missing_ok=True)
        removed = 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # published or removed meanwhile
        return removed

    def _attach(self, fd: int, sidecar: bytes) -> bool:
        """Put the object's metadata in its extended attribute; False where it must go to a
        sidecar instead (no user xattrs here, or more than the filesystem holds)."""
        if not self._xattrs:
            return False
        try:
            os.setxattr(fd, XATTR, sidecar)
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                self._xattrs = False
                return False
            if exc.errno in _XATTR_TOO_BIG:
                return False
            raise
        return True

    def _new_tmp(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        # O_EXCL with a random name instead of mkstemp: mkstemp's 0600 would end up on the
        # published file; this way the usual umask applies.
        path = self._tmp / f"{uuid.uuid4().hex}.tmp"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return path

    def _replace_bytes(self, final: Path, data: bytes) -> None:
        tmp = self._new_tmp()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._publish(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        # The rename is durable only once its directory is synced.
        DIR_SYNC.sync(final.parent)

    # --- reading -------------------------------------------------------------------------------

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(check_key(key))
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise self._error(exc, "read", key) from exc
        with f:
            yield f

    @contextmanager
    def open_from(self, key: str, offset: int) -> Iterator[BinaryIO]:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with self.open(key) as f:
            f.seek(offset)
            yield f

    def iter_lines(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            yield from iter_stream_lines(f)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(check_key(key))
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(path)
        except OSError as exc:
            raise self._error(exc, "head", key) from exc
        try:
            side = json.loads(_read_xattr(path) or self._sidecar(key).read_bytes())
        except FileNotFoundError:
            # Put there by hand, not through us: guess like a web server would.
            return ObjectInfo(key, st.st_size, mimetypes.guess_type(key)[0], {})
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read the metadata of {path}: {exc}", key=key) from exc
        return ObjectInfo(key, st.st_size, side.get("content_type"), dict(side.get("metadata", {})))

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        parent, _, _ = prefix.rpartition("/")
        if parent:
            return self._walk(self.root.joinpath(*parent.split("/")), parent + "/", prefix)
        return self._walk(self.root, "", prefix)

    def _walk(self, directory: Path, base: str, prefix: str) -> Iterator[ObjectInfo]:
        """Keys under ``directory`` in S3's order (byte order of the whole key), lazily.

        Sorting a directory's entries by ``name`` for files and ``name + "/"`` for directories
        gives exactly the order of the full keys, so the walk can stream.
        """
        try:
            with os.scandir(directory) as it:
                entries = []
                for e in it:
                    if not base and e.name == RESERVED_TOP:
                        continue
                    if e.is_dir(follow_symlinks=False):
                        entries.append((e.name + "/", e))
                    elif e.is_file(follow_symlinks=False):
                        entries.append((e.name, e))
        except _NOT_FOUND_ERRORS:
            return
        except OSError as exc:
            raise StorageError(f"cannot list {directory}: {exc.strerror or exc}") from exc
        entries.sort(key=lambda t: t[0])
        for name, e in entries:
            key = base + name
            if name.endswith("/"):
                # Descend only where a match can be: the subtree is under the prefix or the
                # prefix continues into it.
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(Path(e.path), key, prefix)
            elif key.startswith(prefix):
                try:
                    size = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # deleted since the scan
                yield ObjectInfo(key, size)

    def delete(self, key: str) -> None:
        path = self._path(check_key(key))
        for p in (path, self._sidecar(key)):
            try:
                p.unlink()
            except _NOT_FOUND_ERRORS:
                pass
            except OSError as exc:
                raise self._error(exc, "delete", key) from exc

    def copy(self, src_key: str, dst_key: str) -> None:
        (error,) = self.copy_many([(src_key, dst_key)])
        if error is not None:
            raise error

    def copy_many(self, pairs: Sequence[tuple[str, str]]) -> builtins.list[StorageError | None]:
        results: builtins.list[StorageError | None] = []
        touched: set[Path] = set()  # directories to sync once every link is made
        for src_key, dst_key in pairs:
            try:
                self._copy_unsynced(src_key, dst_key, touched)
                results.append(None)
            except OSError as exc:
                results.append(self._error(exc, "copy", src_key))
        try:
            for directory in touched:
                DIR_SYNC.sync(directory)
        except OSError as exc:
            raise StorageError(f"cannot sync {directory}: {exc.strerror or exc}") from exc
        return results

    def _copy_unsynced(self, src_key: str, dst_key: str, touched: set[Path]) -> None:
        src, dst = self._path(check_key(src_key)), self._path(check_key(dst_key))
        # The sidecar first, as a write does: a visible object always has one.
        try:
            self._link_into(self._sidecar(src_key), self._sidecar(dst_key), touched)
        except FileNotFoundError:
            if not src.is_file():
                raise
            # An object put there by hand has no sidecar; its copy must not keep an old one.
            with contextlib.suppress(FileNotFoundError):
                self._sidecar(dst_key).unlink()
        self._link_into(src, dst, touched)

    def _link_into(self, src: Path, final: Path, touched: set[Path]) -> None:
        """``final`` becomes another name of ``src``'s bytes: a hard link (a copy where the
        filesystem cannot link); durable once ``final``'s directory, added to ``touched``, is
        synced. Objects are only ever replaced, never written in place, so a link can never
        see its source change."""
        for attempt in (1, 2):
            try:
                os.link(src, final)  # a new name appears atomically: no temp file needed
                break
            except FileExistsError:
                self._replace_by(src, final, link=True)
                break
            except FileNotFoundError:
                if attempt == 2 or not os.path.lexists(src):
                    raise
                final.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # another filesystem, or links not allowed: copy the bytes
                self._replace_by(src, final, link=False)
                break
        touched.add(final.parent)

    def _replace_by(self, src: Path, final: Path, *, link: bool) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            if link:
                try:
                    os.link(src, tmp)
                except OSError as exc:
                    if isinstance(exc, _NOT_FOUND_ERRORS):
                        raise
                    link = False
            if not link:
                shutil.copyfile(src, tmp)
                if (attached := _read_xattr(src)) is not None:
                    os.setxattr(tmp, XATTR, attached)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def url(self, key: str) -> str:
        return f"{self.public_url}/v1/objects/{urllib.parse.quote(check_key(key))}"

    def check(self) -> None:
        # A real write, not os.access: a read-only mount or a full disk must fail readiness.
        try:
            tmp = self._new_tmp()
            try:
                tmp.write_bytes(b"ok")
            finally:
                tmp.unlink()
        except OSError as exc:
            raise StorageError(
                f"local storage {self.root} is not writable: {exc.strerror or exc}"
            ) from exc

    def read_ref(self, uri: str) -> bytes:
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme != "file":
            raise ValueError(
                f"reference image {uri!r}: only file:///absolute/path references work with "
                "local storage (s3:// needs IMAGEBATCH_STORAGE_URL=s3://...)"
            )
        path = path_from_file_url(uri)
        if self._ref_roots is not None:
            real = Path(os.path.realpath(path))
            if not any(real.is_relative_to(r) for r in self._ref_roots):
                raise ValueError(
                    f"reference image {uri!r} is not under a directory listed in "
                    "IMAGEBATCH_LOCAL_REF_ROOTS"
                )
        try:
            # O_NONBLOCK: a FIFO must not hang the worker; it is refused just below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if isinstance(exc, _NOT_FOUND_ERRORS):
                raise ObjectNotFound(f"reference image {uri} does not exist", key=uri) from exc
            if isinstance(exc, PermissionError):
                raise ReferenceUnreadable(
                    f"reference image {uri}: permission denied", key=uri
                ) from exc
            raise StorageError(
                f"cannot read reference image {uri}: {exc.strerror}", key=uri
            ) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ValueError(f"reference image {uri!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if st.st_size > MAX_REF_BYTES:
                raise ObjectTooLarge(
                    f"reference image {uri} is {st.st_size / 1e6:.1f} MB; "
                    f"the limit is {MAX_REF_BYTES // (1024 * 1024)} MB",
                    key=uri,
                )
            try:
                return read_capped(f, MAX_REF_BYTES, what=f"reference image {uri}")
            except OSError as exc:
                raise StorageError(
                    f"cannot read reference image {uri}: {exc.strerror or exc}", key=uri
                ) from exc

    # --- helpers -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _sidecar(self, key: str) -> Path:
        return self._meta.joinpath(*key.split("/")).with_name(key.rsplit("/", 1)[-1] + ".json")

    def _error(self, exc: OSError, action: str, key: str) -> StorageError:
        if isinstance(exc, _NOT_FOUND_ERRORS) and action != "write":
            return ObjectNotFound(f"{self.description}/{key} does not exist", key=key)
        return StorageError(
            f"cannot {action} {self.description}/{key}: {exc.strerror or exc}", key=key
        )
