"""The CSV form of a job: a catalog file whose rows are the items, the job fields in the query.

Owns reading the CSV document: the query parameters that carry the job fields (``model``,
``mode``, the image parameters as defaults, ``labels`` and ``label.<key>``, ``max_cost_usd``,
``webhook_url``, ``template``), the delimiter, the header and its columns, the rows (blank
lines skipped, ragged rows reported), which columns hold ids and edit references, and the edit
references of one cell. It produces a job document and rows that the builder validates as it
validates a JSON job with ``template`` and ``rows``.

Failure semantics: a body that cannot be read (not UTF-8, a CSV syntax error) raises a 400
:class:`Problem` at once, naming the byte or line. Anything else wrong is added to the job's
:class:`FieldErrors` to be raised with the rest of the job's errors, except an empty CSV or one
with more rows than a job may hold, which raise the 422 at once with the errors found so far.
"""

from __future__ import annotations

import bisect
import csv
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import orjson

from service.errors import FieldErrors, malformed
from service.jobs.messages import clip, clip_key, json_type, show, unknown_message
from service.jobs.schema import CSV_PARAMS, PARAM_FIELDS

_CSV_DELIMITERS = {",": ",", ";": ";", "\t": "\t", "tab": "\t", "|": "|"}
# A catalog has tens of columns; thousands are an attack on the parser, not a catalog.
MAX_COLUMNS = 1000
# Lines of the body, each with its terminator (a quoted field may span several).
_LINE_RE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
# {name} placeholders of a template (literal {{ and }} skipped): the columns a row must keep.
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
# Whole numbers and decimals as a query parameter may spell them: ASCII digits, nothing else.
_INT_RE = re.compile(r"[0-9]{1,9}", re.ASCII)
_DECIMAL_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?", re.ASCII)

# What csv_refs returns for a cell it has reported as malformed (None means an empty cell).
MISSING: Any = object()


class RowLines(Sequence[int]):
    """Each row's CSV line number, written down only where it does not follow from the row
    before (a blank line skipped, a quoted field over several lines): a few bytes for the whole
    file, not one number a row."""

    __slots__ = ("_count", "_last", "_lines", "_rows")

    def __init__(self) -> None:
        self._rows: array[int] = array("I")  # a row whose line does not follow...
        self._lines: array[int] = array("I")  # ...and its line
        self._count = 0
        self._last = -1  # the line of the row appended last

    def append(self, line: int) -> None:
        if line != self._last + 1:
            self._rows.append(self._count)
            self._lines.append(line)
        self._count += 1
        self._last = line

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("row out of range")
        k = bisect.bisect_right(self._rows, i) - 1
        return self._lines[k] + i - self._rows[k]


class RowSeq:
    """The rows of a CSV body, read again from the body when the builder asks for them.

    The body is already the most compact form of its rows, so they are not copied out of it:
    the first pass counts them and checks their shape, :meth:`drain` reads them a second time,
    each as an object of the columns the job uses, and lets go of the body at the end.
    """

    __slots__ = ("_body", "_count", "_delimiter", "_kept")

    def __init__(
        self,
        body: bytes | bytearray | memoryview,
        delimiter: str,
        kept: list[tuple[int, str]],
        count: int,
    ) -> None:
        self._body: bytes | bytearray | memoryview | None = body
        self._delimiter, self._kept, self._count = delimiter, kept, count

    def __len__(self) -> int:
        return self._count

    def drain(self) -> Iterator[dict[str, str]]:
        """Each row, in order (once only)."""
        body, self._body = self._body, None
        assert body is not None, "the rows of a CSV are drained once"
        reader = _records(body, self._delimiter)
        del body
        _header(reader)
        kept = self._kept
        for record in reader:
            if not _blank(record):
                yield {c: record[i] for i, c in kept if i < len(record)}


@dataclass(slots=True)
class CsvRows:
    columns: list[str]
    rows: RowSeq  # each row an object of the columns the job uses, read from the body
    lines: RowLines  # each row's CSV line number
    ragged: set[int]  # rows whose field count differs from the header's (already reported)
    id_key: str | None
    images_key: str | None
    mask_key: str | None


def csv_document(
    body: bytes | bytearray | memoryview,
    params: Mapping[str, str],
    errs: FieldErrors,
    *,
    max_items: int,
) -> tuple[dict[str, Any], CsvRows]:
    """The job fields from the query parameters, and the rows from the body."""
    doc = _query_fields(params, errs)

    delimiter = _CSV_DELIMITERS.get(params.get("delimiter", ","))
    if delimiter is None:
        errs.add("delimiter", "delimiter must be one of ',', ';', '|' or 'tab'")
        delimiter = ","

    needed = _needed_columns(doc.get("template"), params)
    columns, rows, lines, ragged = _read_rows(body, delimiter, errs, max_items, needed)

    id_key = _column(params, "id_column", ("id", "sku"), columns, errs)
    images_key = _column(params, "images_column", ("images",), columns, errs)
    mask_key = _column(params, "mask_column", ("mask",), columns, errs)
    if "template" not in doc:
        if "prompt" in columns:
            doc["template"] = "{prompt}"
        else:
            errs.add(
                "template",
                "a CSV job needs ?template= with {column} placeholders, or a 'prompt' column",
            )
    csv_rows = CsvRows(columns, rows, lines, ragged, id_key, images_key, mask_key)
    return doc, csv_rows


def csv_refs(cell: Any, path: str, index: int, item_id: str | None, errs: FieldErrors) -> Any:
    """Edit references from a CSV cell: None (empty), a list, or MISSING when malformed."""
    if cell is None or not cell.strip():
        return None
    cell = cell.strip()
    if cell.startswith("["):
        try:
            refs = orjson.loads(cell)
        except orjson.JSONDecodeError as exc:
            errs.add(
                path, f"a cell starting with '[' must be a JSON array: {exc.msg}", index, item_id
            )
            return MISSING
        return refs
    return [cell]


def _query_fields(params: Mapping[str, str], errs: FieldErrors) -> dict[str, Any]:
    """The job document the query parameters describe (the rows come from the body)."""
    doc: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    labels: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(value, str):
            errs.add(clip_key(key), "query parameters are strings")
            continue
        if key.startswith("label."):
            labels[key[len("label.") :]] = value
        elif key == "labels":
            try:
                parsed = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                errs.add("labels", f"labels must be a JSON object: {exc.msg}")
                continue
            if isinstance(parsed, dict):
                labels.update(parsed)
            else:
                errs.add("labels", f"labels must be a JSON object, not {json_type(parsed)}")
        elif key in ("n", "output_compression"):
            if _INT_RE.fullmatch(value):
                defaults[key] = int(value)
            else:
                errs.add(key, f"{key} must be a whole number (digits 0-9), not {show(value)}")
        elif key == "max_cost_usd":
            if _DECIMAL_RE.fullmatch(value):
                doc[key] = float(value)
            else:
                errs.add(key, f"max_cost_usd must be a number like 25 or 12.5, not {show(value)}")
        elif key in PARAM_FIELDS:
            defaults[key] = value
        elif key in (
            "model",
            "mode",
            "webhook_url",
            "template",
            "reuse",
            "deadline",
            "on_deadline",
        ):
            doc[key] = value
        elif key not in ("id_column", "images_column", "mask_column", "delimiter"):
            errs.add(clip_key(key), unknown_message(key, CSV_PARAMS, "a CSV job"))
    if labels:
        doc["labels"] = labels
    if defaults:
        doc["defaults"] = defaults
    return doc


def _needed_columns(template: Any, params: Mapping[str, str]) -> set[str] | None:
    """The columns rows must keep (placeholders, id, images, mask); None keeps them all."""
    if template is None:
        template = "{prompt}"
    if not isinstance(template, str):
        return None
    names = {m.group(1) for m in _PLACEHOLDER_RE.finditer(template) if m.group(1)}
    names.update(("id", "sku", "images", "mask"))
    names.update(params[p] for p in ("id_column", "images_column", "mask_column") if p in params)
    return names


def _lines(body: bytes | bytearray | memoryview) -> Iterator[str]:
    """The body's lines as text, decoded one at a time (a UTF-8 BOM skipped): the whole body is
    never held twice."""
    data = body if not isinstance(body, memoryview) else body.obj
    for n, m in enumerate(_LINE_RE.finditer(data)):
        raw = m.group()
        try:
            yield raw.decode("utf-8-sig" if n == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            at = m.start() + exc.start
            raise malformed(
                f"The CSV is not UTF-8: byte 0x{raw[exc.start]:02x} at position {at} "
                f"cannot be decoded. Save the file as UTF-8."
            ) from None


def _records(body: bytes | bytearray | memoryview, delimiter: str) -> Any:
    return csv.reader(_lines(body), delimiter=delimiter, strict=True)


def _header(reader: Any) -> list[str] | None:
    """The header row (blank lines before it skipped); None for an empty CSV."""
    header = next(reader, None)
    while header is not None and not any(h.strip() for h in header):
        header = next(reader, None)  # blank lines (or only delimiters) before the header
    return header


def _blank(record: list[str]) -> bool:
    return not record or (len(record) == 1 and not record[0].strip())


def _read_rows(
    body: bytes | bytearray | memoryview,
    delimiter: str,
    errs: FieldErrors,
    max_items: int,
    needed: set[str] | None,
) -> tuple[list[str], RowSeq, RowLines, set[int]]:
    """The header's columns, and the rows with their CSV line numbers and the ragged ones.

    A row keeps only the ``needed`` columns, so memory follows what the job uses, not how wide
    the catalog is; and the rows stay in the body until the builder reads them (:class:`RowSeq`).
    """
    reader = _records(body, delimiter)
    try:
        header = _header(reader)
        if header is None:
            errs.add("rows", "the CSV is empty: it needs a header row and one row per item")
            errs.raise_if_any()
            raise AssertionError("unreachable")
        columns = [h.strip() for h in header]
        if len(columns) > MAX_COLUMNS:
            errs.add("header", f"the CSV has {len(columns):,} columns; at most {MAX_COLUMNS:,}")
            errs.raise_if_any()
        counts = Counter(c for c in columns if c)
        dupes = sorted(c for c, k in counts.items() if k > 1)
        if dupes:
            errs.add(
                "header", f"column '{clip(dupes[0], 64)}' appears more than once in the header"
            )
        width = len(columns)
        kept = [(i, c) for i, c in enumerate(columns) if needed is None or c in needed]
        lines = RowLines()
        ragged: set[int] = set()
        for record in reader:
            if _blank(record):
                continue
            index = len(lines)
            if index >= max_items:
                errs.add(
                    "rows",
                    f"the CSV has more than {max_items:,} rows; a job may hold at most "
                    f"{max_items:,} (split it into several jobs)",
                )
                errs.raise_if_any()
            if len(record) != width:
                errs.add(
                    f"rows[{index}]",
                    f"CSV line {reader.line_num} has {len(record)} fields; the header has {width}",
                    index,
                )
                ragged.add(index)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise malformed(
            f"The CSV could not be read at line {reader.line_num}: {exc}.",
            extra={"line": reader.line_num},
        ) from None
    return columns, RowSeq(body, delimiter, kept, len(lines)), lines, ragged


def _column(
    params: Mapping[str, str],
    param: str,
    fallbacks: Iterable[str],
    columns: list[str],
    errs: FieldErrors,
) -> str | None:
    """The column ``param`` names, else the first of ``fallbacks`` the CSV has, else None."""
    chosen = params.get(param)
    if chosen is not None:
        if chosen not in columns:
            errs.add(
                param,
                f"{param} '{clip(chosen, 64)}' is not a column of the CSV; its columns are: "
                f"{clip(', '.join(columns), 400)}",
            )
            return None
        return chosen
    return next((c for c in fallbacks if c in columns), None)
