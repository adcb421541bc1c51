"""Reading a JSON job body within a memory and time budget.

A parsed JSON document can be far bigger than its text: ``{}`` is 3 bytes of body and 72 bytes
of Python, so ten million empty items (30 MB) would grow the API by 700 MB before any check saw
them, and a one-shot C parser holds the GIL for the whole parse, so the event loop (``/healthz``)
stalls for as long. :func:`load` therefore builds the document itself from ijson's event stream
(yajl2's C tokenizer, fed a small chunk at a time), which lets it:

* keep an account of what the tree costs (``sys.getsizeof`` of each value, containers' slots)
  and refuse the body (413) the moment the account passes :data:`DENSITY` times the body
  (:data:`FLOOR_BYTES` at least), before the rest is built;
* refuse more items (or rows) than a job may hold the moment there is one too many (422 on
  ``items``), and nesting deeper than a job ever is;
* refuse a key an object already has (422 naming its path: orjson and ``json`` keep the last
  value silently, so a job whose ``"quality"`` appears twice would mean what the caller did not
  write);
* give the interpreter back between events, so other threads (the event loop) run while a
  large body parses.

Keys are interned: 100,000 items share one ``"prompt"`` string. A job's ``items`` (or ``rows``)
are not kept as a tree at all: each element, once read, is kept as its compact JSON text in a
:class:`RawSeq` (a few buffers, no Python object per item) and its tree is dropped, so the parse
holds about the body's size again, not several times it, and the builder reads the elements back
one at a time.

Failure semantics: every refusal is a :class:`~service.errors.Problem`: 400 for text that is not
JSON (with the line and column when the body is small enough to ask orjson where), 413 for a body
too dense to hold, 422 naming ``items``/``rows``, a duplicated key's path, or a too-deep value.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ijson
import orjson

from service.errors import FieldError, Problem, invalid, malformed
from service.jobs.messages import clip

# A body whose parsed tree would cost more than this many times its size is refused...
DENSITY = 2
# ...unless the tree stays under this: small bodies are never refused for their shape.
FLOOR_BYTES = 64 * 1024 * 1024
# Deeper than any job (an item's images list is at depth 3).
MAX_DEPTH = 16
# Bytes handed to the tokenizer at a time: a 256th of the body, within these bounds. The C
# tokenizer turns a whole chunk into a list of events before the first is read, and an event can
# cost 40 times its text (``{},`` is two tuples), so the chunk is kept small next to the body.
CHUNK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 1024
# A malformed body up to this size is parsed again by orjson to say where it breaks.
_LOCATE_BYTES = 8 * 1024 * 1024
# What a container costs before its contents, and per slot (CPython 3.11, 64-bit).
_DICT, _DICT_ENTRY, _LIST, _LIST_SLOT = 64, 40, 56, 8
_SEQUENCES = ("items", "rows")
# A RawSeq's buffers are this big: what is freed at a time as the builder reads them.
_SEGMENT_BYTES = 1024 * 1024


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = True


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a job is parsed and validated.

    Building 100,000 items makes the collector run its full pass over the growing tree again
    and again, each pass holding the GIL (and so the event loop) for tens of milliseconds and
    the whole parse twice as long; parsing makes no reference cycles for it to find. Nested and
    concurrent parses share one pause; the collector comes back when the last one ends.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


class RawSeq:
    """A job's ``items`` or ``rows`` as read: each element's compact JSON text, in segments.

    What the builder iterates instead of a list of parsed items: :meth:`drain` gives the elements
    back parsed, one at a time, and lets go of each segment once it has passed it, so the text
    and the items built from it are never both held whole. Elements are separated by a newline
    (compact JSON never holds one: a newline in a string is written ``\\n``), so an element
    costs its text and one byte.
    """

    __slots__ = ("_buffer", "_count", "_segments", "started")

    def __init__(self) -> None:
        self._segments: list[bytearray | None] = []
        self._buffer = bytearray()
        self.started = 0  # elements begun (the one being read included)
        self._count = 0

    def begin(self, max_items: int, name: str) -> int:
        """The index of the element that starts now; a 422 on ``name`` past ``max_items``."""
        index = self.started
        if index >= max_items:
            raise invalid(
                name,
                f"the job has {index + 1:,} items or more; a job may hold at most "
                f"{max_items:,} (split it into several jobs)",
            )
        self.started += 1
        return index

    def append_json(self, text: bytes) -> None:
        """Keep one element, given as compact JSON (one line: as ``orjson.dumps`` writes it)."""
        self._buffer += text
        self._buffer += b"\n"
        self._count += 1
        if len(self._buffer) >= _SEGMENT_BYTES:
            self._segments.append(self._buffer)
            self._buffer = bytearray()

    def __len__(self) -> int:
        return self._count

    def drain(self) -> Iterator[Any]:
        """Each element, parsed, in order; the text is released as it is read (once only)."""
        if self._buffer:
            self._segments.append(self._buffer)
            self._buffer = bytearray()
        for i, data in enumerate(self._segments):
            assert data is not None, "a RawSeq is drained once"
            self._segments[i] = None
            start = 0
            with memoryview(data) as view:
                while (end := data.find(b"\n", start)) >= 0:
                    yield orjson.loads(view[start:end])
                    start = end + 1
            del data
        self._count = 0


class _Reader:
    """A file-like view of the body for ijson: chunks are copied out, the body never is."""

    def __init__(self, body: bytes | bytearray | memoryview) -> None:
        self.view, self.pos = memoryview(body), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else self.pos + size
        chunk = bytes(self.view[self.pos : end])
        self.pos += len(chunk)
        return chunk


def load(body: bytes | bytearray | memoryview, *, max_items: int) -> Any:
    """The parsed body; a Problem for anything it must not cost or cannot be."""
    try:
        return _build(body, max_items)
    except ijson.JSONError as exc:
        if "overflow" in str(exc) and len(body) <= _LOCATE_BYTES:
            # yajl stops at numbers past 64 bits, which JSON allows; a small body is parsed
            # whole instead, so the field that holds one is named (max_cost_usd: 1e400).
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                pass
        raise _not_json(body, exc) from None


def _build(body: bytes | bytearray | memoryview, max_items: int) -> Any:
    budget = max(DENSITY * len(body), FLOOR_BYTES)
    cost = 0
    interned: dict[str, str] = {}
    stack: list[Any] = []  # open containers, outermost first
    where: list[str | int] = []  # the key or index each open container sits under
    key: list[str | None] = []  # per open object: the key whose value comes next
    root: Any = None
    element_cost = 0
    chunk = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, len(body) // 256))
    for event, value in ijson.basic_parse(_Reader(body), use_float=True, buf_size=chunk):
        if event == "map_key":
            top = stack[-1]
            name = interned.setdefault(value, value)
            if name in top:
                path, index = _path(where, name)
                raise invalid(
                    path, f"the key '{clip(name, 64)}' appears twice in this object", index
                )
            key[-1] = name
            if name is value:
                cost += sys.getsizeof(name)
            continue
        if event in ("end_map", "end_array"):
            done = stack.pop()
            where.pop(), key.pop()
            if stack and type(stack[-1]) is RawSeq:
                # An element of items/rows is read: kept as its text, its tree dropped.
                text = orjson.dumps(done)
                stack[-1].append_json(text)
                cost = element_cost + len(text) + _LIST_SLOT
            continue
        if event == "start_map":
            new: Any = {}
            cost += _DICT
        elif event == "start_array":
            new = []
            cost += _LIST
        else:
            new = value
            size = 0 if value is None or value is True or value is False else sys.getsizeof(value)
            cost += size
        # Attach the value to its container.
        if not stack:
            root = new
            slot: str | int = ""
        elif type(stack[-1]) is dict:
            slot = key[-1] or ""
            if event == "start_array" and len(stack) == 1 and slot in _SEQUENCES:
                new = RawSeq()
            stack[-1][slot] = new
            cost += _DICT_ENTRY
        elif type(stack[-1]) is RawSeq:
            slot = stack[-1].begin(max_items, str(where[-1]))
            if event in ("start_map", "start_array"):
                element_cost = cost  # what the tree cost before this element
            else:
                text = orjson.dumps(new)
                stack[-1].append_json(text)
                cost += len(text) + _LIST_SLOT - size
        else:
            slot = len(stack[-1])
            stack[-1].append(new)
            cost += _LIST_SLOT
        if cost > budget:
            raise _too_dense(budget, len(body))
        if event in ("start_map", "start_array"):
            if len(stack) >= MAX_DEPTH:
                path, index = _path([*where[1:], slot], "")
                raise invalid(path.rstrip("."), f"values nest more than {MAX_DEPTH} deep", index)
            stack.append(new)
            where.append(slot)
            key.append(None)
    return root


def _too_dense(budget: int, size: int) -> Problem:
    return Problem(
        413,
        "The request body is too large",
        f"The body would take more than {budget // 2**20:,} MB to hold once parsed "
        f"({DENSITY}x its {size:,} bytes): it has far more, far smaller values than a job does.",
        errors=[FieldError("body", "too many, too small values to hold")],
    )


def _path(where: list[str | int], name: str) -> tuple[str, int | None]:
    """A field path like ``items[3].quality`` (the root's own slot skipped), and the item index."""
    parts = ""
    for seg in where[1:]:
        parts += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if parts else str(seg))
    if name:
        parts = f"{parts}.{clip(name, 64)}" if parts else clip(name, 64)
    index = where[2] if len(where) > 2 and where[1] in _SEQUENCES else None
    return parts, index if isinstance(index, int) else None


def _not_json(body: bytes | bytearray | memoryview, exc: Exception) -> Problem:
    if len(body) <= _LOCATE_BYTES:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as located:
            return malformed(
                f"The body is not valid JSON: {located.msg} at line {located.lineno} column "
                f"{located.colno} (byte {located.pos}).",
                extra={"line": located.lineno, "column": located.colno, "position": located.pos},
            )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "it ends too early"
    return malformed(f"The body is not valid JSON: {first}.")
