"""The Batch API: validation, the time-driven lifecycle, output and error files, the token queue.

A batch lives as ``{data_dir}/batches/{id}.json`` (the ``Batch`` object plus a checkpoint) and,
while it runs, two growing files ``{id}.output.part`` / ``{id}.error.part``. One asyncio task per
unfinished batch drives it through OpenAI's states (facts §1.2 to §1.4):

``validating`` (``--validate-seconds``; the input is streamed once) → ``failed`` with ``errors``, or
``in_progress`` (lines run at ``--rate`` images/s; ``request_counts`` advance per line) →
``finalizing`` (``--finalize-seconds``) → ``completed``. ``cancel`` goes ``cancelling`` →
``cancelled``; at ``created_at + --completion-window`` the batch goes ``expired``. Finished lines
stay in the output (and are billed); lines not run are written to the error file with
``batch_cancelled`` / ``batch_expired``. Output files are published (purpose ``batch_output``)
only if they hold a line, so a batch whose lines all failed ends ``completed`` with
``output_file_id`` null.

Validation error codes in ``errors.data[].code``: ``invalid_json_line``, ``missing_required_parameter``
(custom_id, body), ``invalid_value`` (method), ``duplicate_custom_id``, ``url_mismatch``,
``model_mismatch``, ``model_not_found`` (unknown or shut down), ``unsupported_model`` (no batch
support: the catalog's ``batch = false`` or ``--batch-unsupported``; or not for this endpoint), ``empty_file``, ``too_many_tasks`` (over the line cap),
``file_too_large`` (over the byte cap), ``input_file_not_found``; and after validation, over the
enqueued-token limit, ``token_limit_exceeded`` (``line`` null), as upstream does.

Memory stays bounded: the input is read a window of lines at a time (at most
:data:`WINDOW_LINES` lines or :data:`WINDOW_BYTES` bytes), the window's lines run in a shuffled
order and each result is appended to its file at once, so output order differs from input order
while nothing large is held. After each window the record is checkpointed (input offset, file
sizes, counts); a restarted simulator truncates the part files to the checkpoint and carries on,
so files, counts and billing stay consistent across a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from service.catalog import EDITS, GENERATIONS
from service.tokens import input_image_tokens, prompt_tokens
from simulator.config import SimulatorConfig
from simulator.errors import APIError, invalid, new_id, not_found, request_id, server_error
from simulator.files import BATCH_FILE_TTL, FileStore, check_ttl
from simulator.generation import MAX_N, ImageMaker, resolve_edit_refs
from simulator.limits import ORG, injected_failure
from simulator.stats import Stats, Tally

log = logging.getLogger("simulator.batches")

# Endpoints OpenAI's Batch API takes (facts §1.2); the simulator runs the image ones.
BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
SUPPORTED_ENDPOINTS = (GENERATIONS, EDITS)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# States in which a validated batch's input tokens count against the model's queue (facts §2).
ENQUEUED = frozenset({"in_progress", "finalizing", "cancelling"})
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_VALIDATION_ERRORS = 100
WINDOW_LINES = 256
WINDOW_BYTES = 16 * 1024 * 1024

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


@dataclass
class Checkpoint:
    """Where a running batch is durably: next input byte, lines consumed, part-file sizes, counts."""

    offset: int = 0
    line: int = 0
    out_size: int = 0
    err_size: int = 0
    tally: Tally = field(default_factory=Tally)


@dataclass
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: float
    expires_at: float
    metadata: dict[str, str] | None = None
    model: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    input_tokens: int = 0
    output_ttl: int | None = None
    tally: Tally = field(default_factory=Tally)
    ckpt: Checkpoint = field(default_factory=Checkpoint)

    def enqueued_tokens(self) -> int:
        return self.input_tokens if self.status in ENQUEUED else 0

    def to_api(self) -> dict[str, Any]:
        def ts(v: float | None) -> int | None:
            return None if v is None else int(v)

        usage = None
        if self.status != "validating" and self.in_progress_at is not None:
            t = self.tally
            inp = t.text_input + t.image_input
            usage = {
                "input_tokens": inp,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": t.image_output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": inp + t.image_output,
            }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": ts(self.in_progress_at),
            "expires_at": ts(self.expires_at),
            "finalizing_at": ts(self.finalizing_at),
            "completed_at": ts(self.completed_at),
            "failed_at": ts(self.failed_at),
            "expired_at": ts(self.expired_at),
            "cancelling_at": ts(self.cancelling_at),
            "cancelled_at": ts(self.cancelled_at),
            "request_counts": {
                "total": self.total,
                "completed": self.tally.completed,
                "failed": self.tally.failed,
            },
            "usage": usage,
            "metadata": self.metadata,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BatchRecord:
        raw = dict(raw)
        raw["tally"] = Tally.from_json(raw.get("tally"))
        ck = dict(raw.get("ckpt") or {})
        ck["tally"] = Tally.from_json(ck.get("tally"))
        raw["ckpt"] = Checkpoint(**ck)
        return cls(**raw)


@dataclass
class _Scan:
    lines: int = 0
    model: str | None = None
    input_tokens: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Outcome:
    ok: bool
    injected: bool = False
    text: int = 0
    image: int = 0
    output: int = 0
    images: int = 0


def _err(
    code: str, message: str, line: int | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _peek_n(body: Any) -> int:
    n = body.get("n", 1) if isinstance(body, dict) else 1
    return n if isinstance(n, int) and 1 <= n <= MAX_N else 1


class BatchEngine:
    """Owns every batch: their records, their tasks and the enqueued-token queue."""

    def __init__(
        self,
        config: SimulatorConfig,
        files: FileStore,
        maker: ImageMaker,
        stats: Stats,
        root: Path,
        clock: Callable[[], float] = time.time,
        on_finished: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self.config = config
        # Told of each batch once it ends (completed, failed, expired or cancelled) and is saved:
        # the webhook sender. It must return at once.
        self.on_finished = on_finished
        self.files = files
        self.maker = maker
        self.stats = stats
        self.root = root
        self.clock = clock
        self.records: dict[str, BatchRecord] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wakers: dict[str, asyncio.Event] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-batch")

    # --- persistence ----------------------------------------------------------------------------

    def load(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for meta in self.root.glob("*.json"):
            try:
                rec = BatchRecord.from_json(json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable batch record %s: %s", meta, exc)
                continue
            if rec.status not in TERMINAL:
                # Counts as of the checkpoint: the part files are cut back to it when it resumes.
                rec.tally = Tally(**asdict(rec.ckpt.tally))
            self.records[rec.id] = rec

    def _save(self, rec: BatchRecord) -> None:
        path = self.root / f"{rec.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(rec.to_json()))
        os.replace(tmp, path)

    def _part(self, rec: BatchRecord, kind: str) -> Path:
        return self.root / f"{rec.id}.{kind}.part"

    # --- lifecycle of the engine ----------------------------------------------------------------

    def start(self) -> None:
        for rec in self.records.values():
            if rec.status not in TERMINAL and rec.id not in self._tasks:
                self._spawn(rec)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _spawn(self, rec: BatchRecord) -> None:
        self._wakers[rec.id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(rec), name=f"batch {rec.id}")
        self._tasks[rec.id] = task
        task.add_done_callback(functools.partial(self._forget_task, rec.id))

    def _forget_task(self, batch_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(batch_id, None)

    # --- the API's operations ---------------------------------------------------------------------

    def create(self, body: Any) -> BatchRecord:
        if not isinstance(body, dict):
            raise invalid("The request body must be a JSON object.")
        known = {
            "input_file_id",
            "endpoint",
            "completion_window",
            "metadata",
            "output_expires_after",
        }
        for key in body:
            if key not in known:
                raise invalid(f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise invalid(
                    f"Missing required parameter: '{key}'.",
                    param=key,
                    code="missing_required_parameter",
                )
        endpoint = body["endpoint"]
        if endpoint not in BATCH_ENDPOINTS:
            raise invalid(
                f"Invalid value for 'endpoint': '{endpoint}'. Supported values are: {', '.join(BATCH_ENDPOINTS)}.",
                param="endpoint",
                code="invalid_value",
            )
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise invalid(
                f"The simulator runs batches for {' and '.join(SUPPORTED_ENDPOINTS)} only, not {endpoint}.",
                param="endpoint",
                code="unsupported_value",
            )
        if body["completion_window"] != "24h":
            raise invalid(
                f"Invalid value for 'completion_window': '{body['completion_window']}'. Supported values are: '24h'.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = _check_metadata(body.get("metadata"))
        output_ttl = None
        oea = body.get("output_expires_after")
        if oea is not None:
            if not isinstance(oea, dict) or oea.get("anchor") != "created_at":
                raise invalid(
                    'Invalid \'output_expires_after\': expected {"anchor": "created_at", "seconds": N}.',
                    param="output_expires_after",
                    code="invalid_value",
                )
            seconds = oea.get("seconds")
            if not isinstance(seconds, int) or isinstance(seconds, bool):
                raise invalid(
                    "Invalid type for 'output_expires_after.seconds': expected an integer.",
                    param="output_expires_after.seconds",
                    code="invalid_type",
                )
            check_ttl(seconds, "output_expires_after.seconds")
            output_ttl = seconds
        try:
            input_file = self.files.get(body["input_file_id"])
        except APIError as exc:
            raise invalid(
                f"Invalid 'input_file_id': no such file '{body['input_file_id']}'.",
                param="input_file_id",
                code="invalid_value",
            ) from exc
        if input_file.purpose != "batch":
            raise invalid(
                f"The input file {input_file.id} has purpose '{input_file.purpose}'; a batch input "
                "file must be uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        now = self.clock()
        rec = BatchRecord(
            id=new_id("batch_", 32),
            endpoint=endpoint,
            input_file_id=input_file.id,
            completion_window="24h",
            status="validating",
            created_at=now,
            expires_at=now + self.config.completion_window,
            metadata=metadata,
            output_ttl=output_ttl,
        )
        self.records[rec.id] = rec
        self._save(rec)
        self._spawn(rec)
        return rec

    def get(self, batch_id: str) -> BatchRecord:
        rec = self.records.get(batch_id)
        if rec is None:
            raise not_found(f"No batch found with id '{batch_id}'.", param="batch_id")
        return rec

    def page(self, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        recs = sorted(self.records.values(), key=lambda r: (r.created_at, r.id), reverse=True)
        if after is not None:
            ids = [r.id for r in recs]
            recs = recs[ids.index(after) + 1 :] if after in ids else []
        return recs[:limit], len(recs) > limit

    def cancel(self, batch_id: str) -> BatchRecord:
        rec = self.get(batch_id)
        if rec.status in ("cancelling", "cancelled"):
            return rec
        if rec.status in TERMINAL:
            raise invalid(
                f"Cannot cancel a batch with status '{rec.status}'.",
                param="batch_id",
                code="invalid_state",
            )
        rec.status = "cancelling"
        rec.cancelling_at = self.clock()
        self._save(rec)
        waker = self._wakers.get(rec.id)
        if waker:
            waker.set()
        return rec

    def enqueued(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.records.values():
            if rec.model and rec.enqueued_tokens():
                out[rec.model] = out.get(rec.model, 0) + rec.enqueued_tokens()
        return out

    # --- the task -------------------------------------------------------------------------------

    async def _sleep(self, rec: BatchRecord, seconds: float) -> None:
        """Sleep up to ``seconds``; a cancel wakes it early."""
        waker = self._wakers[rec.id]
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.wait(), timeout=seconds)
        waker.clear()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self, rec: BatchRecord) -> None:
        try:
            if rec.status == "validating":
                await self._validate(rec)
            if rec.status == "in_progress":
                await self._process(rec)
            if rec.status == "finalizing":
                await self._finalize(rec)
            if rec.status == "cancelling":
                await self._wind_down(rec, "cancelled", [], rec.ckpt.offset, rec.ckpt.line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave a batch running forever
            log.exception("batch %s failed inside the simulator", rec.id)
            rec.status = "failed"
            rec.failed_at = self.clock()
            rec.errors = [
                _err("internal_error", f"The simulator failed running this batch: {exc!r}")
            ]
            self._save(rec)
        if rec.status in TERMINAL and self.on_finished is not None:
            try:
                self.on_finished(rec)
            except Exception:  # a listener's bug must not touch the batch
                log.exception("batch %s: on_finished failed", rec.id)

    # --- validating -----------------------------------------------------------------------------

    async def _validate(self, rec: BatchRecord) -> None:
        scan: _Scan = await self._in_thread(self._scan, rec)
        deadline = rec.created_at + self.config.validate_seconds
        while rec.status == "validating" and self.clock() < min(deadline, rec.expires_at):
            await self._sleep(rec, min(deadline, rec.expires_at) - self.clock())
        now = self.clock()
        rec.model = scan.model
        if rec.status == "cancelling":
            # Nothing ran: no files; it is simply cancelled once the cancel has "taken".
            await self._sleep(
                rec,
                rec.cancelling_at + self.config.finalize_seconds - now if rec.cancelling_at else 0,
            )
            rec.status = "cancelled"
            rec.cancelled_at = self.clock()
        elif now >= rec.expires_at:
            rec.status = "expired"
            rec.expired_at = now
        elif scan.errors:
            rec.status = "failed"
            rec.failed_at = now
            rec.errors = scan.errors
        else:
            model = scan.model or ""
            limit = self.config.batch_queue_tokens
            queued = self.enqueued().get(model, 0)
            if limit and queued + scan.input_tokens > limit:
                rec.status = "failed"
                rec.failed_at = now
                rec.errors = [
                    _err(
                        "token_limit_exceeded",
                        f"Enqueued token limit reached for {model} in organization {ORG}. "
                        f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                        "batches have been completed.",
                    )
                ]
            else:
                rec.status = "in_progress"
                rec.in_progress_at = now
                rec.total = scan.lines
                rec.input_tokens = scan.input_tokens
                self.stats.note_enqueued(model, queued + scan.input_tokens)
        self._save(rec)

    def _scan(self, rec: BatchRecord) -> _Scan:
        """Stream the input once: structure, custom ids, model, line count and input tokens."""
        scan = _Scan()
        cfg = self.config
        path = self.files.data_path(rec.input_file_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            scan.errors.append(
                _err(
                    "input_file_not_found",
                    f"The input file {rec.input_file_id} was deleted before validation.",
                )
            )
            return scan
        if size > cfg.max_batch_bytes:
            scan.errors.append(
                _err(
                    "file_too_large",
                    f"The input file is {size:,} bytes; a batch input file may be at most "
                    f"{cfg.max_batch_bytes:,} bytes.",
                )
            )
            return scan
        seen: set[str] = set()
        model_checked = False
        model_obj = None
        errors = scan.errors
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                scan.lines += 1
                if scan.lines > cfg.max_batch_lines:
                    errors.insert(
                        0,
                        _err(
                            "too_many_tasks",
                            f"The batch input file has more than {cfg.max_batch_lines:,} requests; "
                            f"split it into batches of at most {cfg.max_batch_lines:,}.",
                        ),
                    )
                    break
                if len(errors) >= MAX_VALIDATION_ERRORS:
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict):
                    errors.append(
                        _err(
                            "invalid_json_line", "This line is not parseable as valid JSON.", lineno
                        )
                    )
                    continue
                custom_id = obj.get("custom_id")
                if not isinstance(custom_id, str) or not custom_id:
                    errors.append(
                        _err(
                            "missing_required_parameter",
                            "Each request needs a string 'custom_id'.",
                            lineno,
                            "custom_id",
                        )
                    )
                elif custom_id in seen:
                    errors.append(
                        _err(
                            "duplicate_custom_id",
                            f"The custom_id '{custom_id}' is a duplicate of another request. The custom_id "
                            "parameter must be unique for each request in a batch.",
                            lineno,
                            "custom_id",
                        )
                    )
                else:
                    seen.add(custom_id)
                if obj.get("method") != "POST":
                    errors.append(
                        _err(
                            "invalid_value",
                            "The request 'method' must be 'POST'.",
                            lineno,
                            "method",
                        )
                    )
                if obj.get("url") != rec.endpoint:
                    errors.append(
                        _err(
                            "url_mismatch",
                            f"The provided URL '{obj.get('url')}' does not match the batch endpoint "
                            f"'{rec.endpoint}'.",
                            lineno,
                            "url",
                        )
                    )
                body = obj.get("body")
                if not isinstance(body, dict):
                    errors.append(
                        _err(
                            "missing_required_parameter",
                            "Each request needs a JSON object 'body'.",
                            lineno,
                            "body",
                        )
                    )
                    continue
                model_id = body.get("model")
                if not model_checked:
                    model_checked = True
                    scan.model = model_id if isinstance(model_id, str) else None
                    problem = self._model_problem(model_id, rec.endpoint)
                    if problem:
                        errors.append(_err(problem[0], problem[1], lineno, "body.model"))
                    else:
                        model_obj = (
                            self.maker.catalog.get(model_id) if isinstance(model_id, str) else None
                        )
                elif model_id != scan.model:
                    errors.append(
                        _err(
                            "model_mismatch",
                            f"The model '{model_id}' of this request does not match the model "
                            f"'{scan.model}' of the batch's other requests; one batch takes one model.",
                            lineno,
                            "body.model",
                        )
                    )
                if model_obj is not None and not errors:
                    scan.input_tokens += self._line_input_tokens(rec.endpoint, body, model_obj)
        if scan.lines == 0:
            errors.append(_err("empty_file", "The batch input file is empty."))
        return scan

    def _model_problem(self, model_id: object, endpoint: str) -> tuple[str, str] | None:
        if not isinstance(model_id, str):
            return ("model_not_found", "Each request's body needs a 'model'.")
        try:
            model = self.maker.model(model_id, endpoint)
        except APIError as exc:
            return (exc.code or "model_not_found", exc.message)
        if not model.batch or model.id in self.config.batch_unsupported:
            # Upstream's exact code and wording for this are not documented (facts §7.2); this
            # is OpenAI's usual code for a model an endpoint does not take, and the message
            # names the model, which is what a caller needs to learn per model.
            return (
                "unsupported_model",
                f"The model '{model_id}' is not supported by the Batch API.",
            )
        return None

    def _line_input_tokens(self, endpoint: str, body: dict[str, Any], model: Any) -> int:
        """What a line counts against the enqueued-token queue: prompt and input-image tokens."""
        prompt = body.get("prompt")
        tokens = (
            prompt_tokens(prompt, self.maker.catalog.prompt_overhead_tokens)
            if isinstance(prompt, str)
            else 0
        )
        if endpoint == EDITS:
            try:
                inputs, _ = resolve_edit_refs(body, self._file_path)
            except APIError:
                return tokens  # the line will fail when it runs; it queues its prompt only
            high = body.get("input_fidelity") == "high"
            tokens += sum(input_image_tokens(model, i.width, i.height, high) for i in inputs)
        return tokens

    def _file_path(self, file_id: str) -> Path:
        self.files.get(file_id)
        return self.files.data_path(file_id)

    # --- in progress ----------------------------------------------------------------------------

    def _open_parts(self, rec: BatchRecord) -> tuple[BinaryIO, BinaryIO]:
        handles = []
        for kind, size in (("output", rec.ckpt.out_size), ("error", rec.ckpt.err_size)):
            path = self._part(rec, kind)
            # Unbuffered: lines are written whole with writev (a buffered writer copies big
            # writes through its 8 KiB buffer, ten times slower for multi-MB lines).
            fh = path.open("ab", buffering=0)
            # Lines written after the checkpoint are run again: cut them off. (A part already
            # published is not here any more; never grow a file by truncating "up".)
            if fh.tell() > size:
                fh.truncate(size)
                fh.seek(size)
            handles.append(fh)
        return handles[0], handles[1]

    async def _process(self, rec: BatchRecord) -> None:
        path = self.files.data_path(rec.input_file_id)
        try:
            fin = path.open("rb")
        except FileNotFoundError:
            rec.status = "failed"
            rec.failed_at = self.clock()
            rec.errors = [
                _err("input_file_not_found", f"The input file {rec.input_file_id} was deleted.")
            ]
            self._save(rec)
            return
        fout, ferr = self._open_parts(rec)
        try:
            await self._run_lines(rec, fin, fout, ferr)
        finally:
            fin.close()
            fout.close()
            ferr.close()

    async def _run_lines(
        self, rec: BatchRecord, fin: BinaryIO, fout: BinaryIO, ferr: BinaryIO
    ) -> None:
        rate = self.config.rate
        # Images are paced by a bucket that starts empty (the first image takes 1/rate s) and
        # holds at most a tenth of a second's worth; a line of n images may overdraw it, so the
        # average is --rate whatever n is.
        capacity = max(rate / 10, 1.0)
        budget, refilled = 0.0, self.clock()
        fin.seek(rec.ckpt.offset)
        line = rec.ckpt.line
        while True:
            window, offset = await self._in_thread(_read_window, fin)
            if not window:
                break
            order = list(enumerate(window, start=line))
            random.Random(f"{rec.id}:{line}").shuffle(order)
            for pos, (index, raw) in enumerate(order):
                obj = orjson.loads(raw)
                n = _peek_n(obj.get("body"))
                while True:
                    stop = self._stop_reason(rec)
                    if stop:
                        rest = [r for _, r in order[pos:]]
                        await self._wind_down(
                            rec, stop, rest, offset, line + len(window), fout, ferr
                        )
                        return
                    now = self.clock()
                    budget = min(capacity, budget + (now - refilled) * rate)
                    refilled = now
                    need = min(float(n), capacity)
                    if budget >= need:
                        budget -= n
                        break
                    await self._sleep(rec, (need - budget) / rate)
                outcome: _Outcome = await self._in_thread(
                    self._execute, rec, index, obj, fout, ferr
                )
                self._count(rec, outcome)
            line += len(window)
            await self._in_thread(_flush, fout, ferr)
            rec.ckpt = Checkpoint(
                offset, line, fout.tell(), ferr.tell(), Tally(**asdict(rec.tally))
            )
            self._save(rec)
        stop = self._stop_reason(rec)
        if stop == "cancelled":
            await self._wind_down(rec, stop, [], rec.ckpt.offset, rec.ckpt.line, fout, ferr)
            return
        rec.status = "finalizing"
        rec.finalizing_at = self.clock()
        self._save(rec)

    def _stop_reason(self, rec: BatchRecord) -> str | None:
        if rec.status == "cancelling":
            return "cancelled"
        if self.clock() >= rec.expires_at:
            return "expired"
        return None

    def _count(self, rec: BatchRecord, o: _Outcome) -> None:
        t = rec.tally
        t.requests += 1
        if o.ok:
            t.completed += 1
            t.bill(o.text, o.image, o.output, o.images)
        else:
            t.failed += 1
            if o.injected:
                t.server_errors_injected += 1

    def _execute(
        self, rec: BatchRecord, index: int, obj: dict[str, Any], fout: BinaryIO, ferr: BinaryIO
    ) -> _Outcome:
        """Run one line (in a worker thread) and append its result to the output or error file."""
        rid = request_id()
        line_id = new_id("batch_req_", 32)
        custom_id = obj.get("custom_id")
        body = obj.get("body") or {}
        injected = injected_failure(index, self.config.fail_rate)
        error: APIError | None = None
        try:
            if injected:
                raise server_error(rid)
            inputs: tuple[Any, ...] = ()
            mask = None
            if rec.endpoint == EDITS:
                inputs, mask = resolve_edit_refs(body, self._file_path)
            req = self.maker.parse(rec.endpoint, body, inputs=inputs, mask=mask)
            self.maker.moderate(req.prompt, rid)
            payload = self.maker.response_parts(req)
        except APIError as exc:
            error = exc
        except Exception:
            # One line's surprise (a bug, an image Pillow chokes on) fails that line with the
            # 500 upstream would send, never the lines around it.
            log.exception("batch %s line %d failed inside the simulator", rec.id, index)
            error = server_error(rid)
        if error is not None:
            _write_all(
                ferr,
                [
                    orjson.dumps(
                        {
                            "id": line_id,
                            "custom_id": custom_id,
                            "response": {
                                "status_code": error.status,
                                "request_id": rid,
                                "body": error.body(),
                            },
                            "error": None,
                        }
                    )
                    + b"\n"
                ],
            )
            return _Outcome(ok=False, injected=injected)
        head = (
            b'{"id":"'
            + line_id.encode()
            + b'","custom_id":'
            + orjson.dumps(custom_id)
            + b',"response":{"status_code":200,"request_id":"'
            + rid.encode()
            + b'","body":'
        )
        # Parts straight to the file: a line can be many MB, never joined in memory.
        _write_all(fout, [head, *payload, b'},"error":null}\n'])
        return _Outcome(
            ok=True,
            text=req.text_tokens,
            image=req.image_tokens,
            output=req.output_tokens,
            images=req.n,
        )

    # --- the end --------------------------------------------------------------------------------

    async def _wind_down(
        self,
        rec: BatchRecord,
        final: str,
        pending: list[bytes],
        offset: int,
        line: int,
        fout: BinaryIO | None = None,
        ferr: BinaryIO | None = None,
    ) -> None:
        """Cancel or expire: lines not run go to the error file, then the files are published."""
        own = fout is None
        if fout is None or ferr is None:
            fout, ferr = self._open_parts(rec)
        try:
            code, message = (
                ("batch_cancelled", CANCELLED_MESSAGE)
                if final == "cancelled"
                else ("batch_expired", EXPIRED_MESSAGE)
            )
            failed = await self._in_thread(
                self._fail_rest, rec, pending, offset, code, message, ferr
            )
            rec.tally.failed += failed
            await self._in_thread(_flush, fout, ferr)
            rec.ckpt = Checkpoint(
                self.files.data_path(rec.input_file_id).stat().st_size
                if self.files.data_path(rec.input_file_id).exists()
                else offset,
                line,
                fout.tell(),
                ferr.tell(),
                Tally(**asdict(rec.tally)),
            )
        finally:
            if own:
                fout.close()
                ferr.close()
        if final == "cancelled":
            rec.status = "cancelling"
            rec.cancelling_at = rec.cancelling_at or self.clock()
            self._save(rec)
            await self._sleep(rec, rec.cancelling_at + self.config.finalize_seconds - self.clock())
        self._publish(rec)
        now = self.clock()
        rec.status = final
        if final == "cancelled":
            rec.cancelled_at = now
        else:
            rec.expired_at = now
        self._save(rec)

    def _fail_rest(
        self,
        rec: BatchRecord,
        pending: list[bytes],
        offset: int,
        code: str,
        message: str,
        ferr: BinaryIO,
    ) -> int:
        """Write an error line for each pending line and each line after ``offset``."""

        def fail(raw: bytes) -> None:
            try:
                custom_id = orjson.loads(raw).get("custom_id")
            except (orjson.JSONDecodeError, AttributeError):
                custom_id = None
            _write_all(
                ferr,
                [
                    orjson.dumps(
                        {
                            "id": new_id("batch_req_", 32),
                            "custom_id": custom_id,
                            "response": None,
                            "error": {"code": code, "message": message},
                        }
                    )
                    + b"\n"
                ],
            )

        count = 0
        for raw in pending:
            fail(raw)
            count += 1
        path = self.files.data_path(rec.input_file_id)
        if rec.total and path.exists():
            with path.open("rb") as fin:
                fin.seek(offset)
                for raw in fin:
                    if raw.strip():
                        fail(raw)
                        count += 1
        return count

    async def _finalize(self, rec: BatchRecord) -> None:
        start = rec.finalizing_at or self.clock()
        while rec.status == "finalizing" and self.clock() < start + self.config.finalize_seconds:
            await self._sleep(rec, start + self.config.finalize_seconds - self.clock())
        if rec.status == "cancelling":
            # Cancelled while finalizing: every line already ran, so nothing is left to cancel.
            await self._wind_down(rec, "cancelled", [], rec.ckpt.offset, rec.ckpt.line)
            return
        self._publish(rec)
        rec.status = "completed"
        rec.completed_at = self.clock()
        self._save(rec)

    def _publish(self, rec: BatchRecord) -> None:
        """Make the part files into Files (purpose ``batch_output``) if they hold any line."""
        ttl = rec.output_ttl or BATCH_FILE_TTL
        for kind in ("output", "error"):
            attr = f"{kind}_file_id"
            part = self._part(rec, kind)
            if getattr(rec, attr):
                part.unlink(missing_ok=True)
                continue
            if not part.exists():
                continue
            if part.stat().st_size == 0:
                part.unlink()
                continue
            file = self.files.adopt(part, f"{rec.id}_{kind}.jsonl", "batch_output", ttl)
            setattr(rec, attr, file.id)
            self._save(rec)


def _read_window(fin: BinaryIO) -> tuple[list[bytes], int]:
    """Up to WINDOW_LINES non-blank lines (or WINDOW_BYTES) and the offset after them."""
    lines: list[bytes] = []
    size = 0
    while len(lines) < WINDOW_LINES and size < WINDOW_BYTES:
        raw = fin.readline()
        if not raw:
            break
        if raw.strip():
            lines.append(raw)
            size += len(raw)
    return lines, fin.tell()


def _write_all(fh: BinaryIO, parts: list[bytes]) -> None:
    """Append ``parts`` with as few syscalls as the kernel allows, retrying short writes."""
    fd = fh.fileno()
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views[:1024])
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def _flush(*handles: BinaryIO) -> None:
    for h in handles:
        h.flush()


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid(
            "Invalid type for 'metadata': expected an object.",
            param="metadata",
            code="invalid_type",
        )
    if len(metadata) > MAX_METADATA_PAIRS:
        raise invalid(
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise invalid(
                f"Invalid 'metadata': key '{key[:20]}…' is longer than {MAX_METADATA_KEY} characters.",
                param="metadata",
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise invalid(
                f"Invalid type for 'metadata.{key}': expected a string.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise invalid(
                f"Invalid 'metadata.{key}': longer than {MAX_METADATA_VALUE} characters.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return dict(metadata)
