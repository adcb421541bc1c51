"""The Files API's store: uploaded and produced files, kept on disk under ``{data_dir}/files``.

Each file is two entries: ``{id}.data`` (the bytes, never held in memory whole) and ``{id}.json``
(the ``FileObject``), written atomically, so a restarted simulator serves every file it had.
Uploads are parsed from the multipart stream straight into a file beside the store
(:func:`receive_multipart`) and renamed into place; batch outputs are moved in with
:meth:`FileStore.adopt`. A file past its ``expires_at`` is gone: lookups answer 404 and a sweep
deletes it.

Failure semantics: lookups of unknown, deleted or expired ids raise the 404 OpenAI sends
(``No such File object``); bad uploads raise 400 ``invalid_request_error`` naming the field.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from simulator.errors import APIError, invalid, new_id, not_found

# Purposes this simulator accepts on upload (facts §1.5; the ones imagebatch uses).
UPLOAD_PURPOSES = ("batch", "vision", "user_data")
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
# Batch input files expire after 30 days unless told otherwise (facts §1.5).
BATCH_FILE_TTL = 30 * 86_400
MIN_TTL, MAX_TTL = 3_600, 2_592_000
_MAX_FIELD_BYTES = 1 << 20


@dataclass
class FileRecord:
    """An OpenAI ``FileObject``."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None
    status: str = "processed"
    status_details: str | None = None
    object: str = field(default="file")

    def to_api(self) -> dict[str, Any]:
        return asdict(self)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or time.time())


@dataclass
class UploadedPart:
    """A file part of a multipart request, already on disk."""

    name: str
    filename: str
    content_type: str
    path: Path
    size: int


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedPart] = field(default_factory=list)

    def files_named(self, *names: str) -> list[UploadedPart]:
        return [f for f in self.files if f.name in names]

    def discard(self) -> None:
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()


async def receive_multipart(
    request: Request, spool_dir: Path, max_bytes: int = MAX_UPLOAD_BYTES
) -> Form:
    """Parse a multipart body, writing file parts to ``spool_dir`` as they arrive.

    Memory stays bounded by the chunk size whatever the upload's size; a file part over
    ``max_bytes`` is refused with 413-like 400. The caller owns (and must discard) the files.
    """
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise invalid("Expected a multipart/form-data body.", code="invalid_content_type")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"

    form = Form()
    state: dict[str, Any] = {
        "headers": {},
        "hname": b"",
        "hvalue": b"",
        "fh": None,
        "buf": bytearray(),
    }

    def on_part_begin() -> None:
        state["headers"] = {}
        state["buf"] = bytearray()
        state["fh"] = None
        state["part"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].lower()] = state["hvalue"]
        state["hname"] = b""
        state["hvalue"] = b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if b"name" not in opts:
            raise invalid("A multipart part has no name.", code="invalid_multipart")
        name = opts[b"name"].decode(charset, "replace")
        if b"filename" in opts:
            spool_dir.mkdir(parents=True, exist_ok=True)
            path = spool_dir / f"upload-{new_id('', 16)}.part"
            part = UploadedPart(
                name=name,
                filename=opts[b"filename"].decode(charset, "replace"),
                content_type=state["headers"]
                .get(b"content-type", b"application/octet-stream")
                .decode("latin-1"),
                path=path,
                size=0,
            )
            form.files.append(part)
            state["part"] = part
            state["fh"] = path.open("wb")
        else:
            state["name"] = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        fh: BinaryIO | None = state["fh"]
        if fh is not None:
            part: UploadedPart = state["part"]
            part.size += end - start
            if part.size > max_bytes:
                raise invalid(
                    f"File '{part.filename}' is too large: the limit is {max_bytes:,} bytes.",
                    param=part.name,
                    code="file_too_large",
                )
            fh.write(data[start:end])
        else:
            buf: bytearray = state["buf"]
            if len(buf) + end - start > _MAX_FIELD_BYTES:
                raise invalid("A form field is larger than 1 MB.", param=state.get("name"))
            buf.extend(data[start:end])

    def on_part_end() -> None:
        fh = state["fh"]
        if fh is not None:
            fh.close()
            state["fh"] = None
        else:
            form.fields[state["name"]] = state["buf"].decode(charset, "replace")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except APIError:
        _close(state)
        form.discard()
        raise
    except Exception as exc:
        _close(state)
        form.discard()
        raise invalid("The multipart body could not be parsed.", code="invalid_multipart") from exc
    return form


def _close(state: dict[str, Any]) -> None:
    fh = state.get("fh")
    if fh is not None:
        fh.close()


class FileStore:
    """Files on disk with their ``FileObject`` metadata in memory (small: one record per file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = root / "spool"
        self._records: dict[str, FileRecord] = {}

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        # Half-received uploads of a previous run.
        for leftover in self.spool.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        for meta in self.root.glob("*.json"):
            try:
                rec = FileRecord(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if self.data_path(rec.id).exists():
                self._records[rec.id] = rec

    def data_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.data"

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    def _save(self, rec: FileRecord) -> None:
        tmp = self._meta_path(rec.id).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.to_api()))
        os.replace(tmp, self._meta_path(rec.id))

    # --- create -------------------------------------------------------------------------------

    def adopt(self, src: Path, filename: str, purpose: str, ttl: int | None) -> FileRecord:
        """Move ``src`` (on the same filesystem) into the store as a new file."""
        now = int(time.time())
        file_id = new_id("file-", 22)
        os.replace(src, self.data_path(file_id))
        rec = FileRecord(
            id=file_id,
            bytes=self.data_path(file_id).stat().st_size,
            created_at=now,
            filename=filename,
            purpose=purpose,
            expires_at=now + ttl if ttl else None,
        )
        self._save(rec)
        self._records[file_id] = rec
        return rec

    def upload(self, form: Form) -> FileRecord:
        """A ``POST /v1/files`` request (already received): check it and keep its file."""
        parts = form.files_named("file")
        if len(parts) != 1:
            raise invalid(
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        part = parts[0]
        purpose = form.fields.get("purpose")
        if not purpose:
            raise invalid(
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            raise invalid(
                f"Invalid value for 'purpose': '{purpose}'. The simulator accepts "
                f"{', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
                code="invalid_value",
            )
        if purpose == "batch" and not part.filename.endswith(".jsonl"):
            raise invalid("Invalid file format for Batch API. Must be .jsonl", param="file")
        ttl: int | None = BATCH_FILE_TTL if purpose == "batch" else None
        anchor = form.fields.get("expires_after[anchor]")
        seconds = form.fields.get("expires_after[seconds]")
        if anchor is not None or seconds is not None:
            if anchor != "created_at":
                raise invalid(
                    "Invalid value for 'expires_after.anchor': only 'created_at' is supported.",
                    param="expires_after.anchor",
                    code="invalid_value",
                )
            try:
                ttl = int(seconds or "")
            except ValueError as exc:
                raise invalid(
                    "Invalid 'expires_after.seconds': expected an integer.",
                    param="expires_after.seconds",
                    code="invalid_type",
                ) from exc
            check_ttl(ttl, "expires_after.seconds")
        return self.adopt(part.path, part.filename, purpose, ttl)

    # --- read ---------------------------------------------------------------------------------

    def get(self, file_id: str) -> FileRecord:
        rec = self._records.get(file_id)
        if rec is None:
            raise not_found(f"No such File object: {file_id}", param="id")
        if rec.expired():
            self.delete(file_id)
            raise not_found(f"No such File object: {file_id} (it expired)", param="id")
        return rec

    def page(
        self, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[FileRecord], bool]:
        now = time.time()
        recs = [
            r
            for r in self._records.values()
            if not r.expired(now) and (purpose is None or r.purpose == purpose)
        ]
        recs.sort(key=lambda r: (r.created_at, r.id), reverse=(order == "desc"))
        if after is not None:
            ids = [r.id for r in recs]
            recs = recs[ids.index(after) + 1 :] if after in ids else []
        return recs[:limit], len(recs) > limit

    def iter_ids(self) -> Iterator[str]:
        return iter(list(self._records))

    # --- delete -------------------------------------------------------------------------------

    def delete(self, file_id: str) -> bool:
        rec = self._records.pop(file_id, None)
        if rec is None:
            return False
        # An open reader (a running batch, a download) keeps its descriptor; POSIX keeps the data.
        for path in (self._meta_path(file_id), self.data_path(file_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True

    def sweep(self) -> int:
        """Delete expired files; how many went."""
        now = time.time()
        gone = [fid for fid, rec in list(self._records.items()) if rec.expired(now)]
        for fid in gone:
            self.delete(fid)
        return len(gone)


def check_ttl(seconds: int, param: str) -> None:
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise invalid(
            f"Invalid '{param}': must be between {MIN_TTL} (1 hour) and {MAX_TTL} (30 days), got {seconds}.",
            param=param,
            code="invalid_value",
        )
