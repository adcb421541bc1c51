"""Reading a JSON job body within a memory budget: a pre-scan, the parse, duplicate keys.

A parsed JSON document can be far bigger than its text: ``{}`` is 3 bytes of body and 72 bytes of
Python, so ten million empty items (30 MB) would grow the API by 700 MB before any check saw
them. :func:`prescan` measures the document at C speed before it is parsed (strings are cut out
with one regular expression, then the structural characters are counted) and refuses what
cannot be a job, or would cost more than :data:`DENSITY` times the body to hold. Only then does
:func:`load` parse it with orjson, straight from the buffer (no copy), and check that no object
repeats a key: orjson keeps the last value silently, and a job whose ``"quality"`` appears twice
means something the caller did not write. Duplicates are found by comparing the keys the parse
kept with the keys the text holds; only a body that has some is parsed again, slowly, to name
the first one.

Failure semantics: every refusal is a :class:`~service.errors.Problem`: 400 for text that is not
JSON, 413 for a body too dense to hold, 422 naming ``items`` (too many objects to be a job) or
the path of a duplicated key.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from service.errors import Problem, invalid, malformed
from service.jobs.messages import clip

# Every JSON string literal, escapes included (the unrolled loop keeps the regex linear).
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# What holding a parsed value costs, in bytes (CPython 3.11 on 64-bit, measured with
# tracemalloc on orjson's output): a container, a slot in one, a dict entry, a string object
# (keys are interned by orjson and cost only their entry), a number.
_CONTAINER, _SLOT, _ENTRY, _STRING, _NUMBER = 72, 8, 80, 56, 32
# A body whose parse would cost more than this many times its size is refused...
DENSITY = 4
# ...unless that is under this floor: small bodies are never refused for their shape.
FLOOR_BYTES = 64 * 1024 * 1024
# Objects and arrays one item may bring (the item and its images), and the job's own few.
_CONTAINERS_PER_ITEM, _CONTAINERS_PER_JOB = 2, 16


def prescan(body: bytes | bytearray | memoryview, max_items: int) -> int:
    """Refuse a body that cannot be a job or would cost too much to parse; the keys it holds."""
    stripped, strings = _STRING_RE.subn(b'""', body)
    containers = stripped.count(b"{") + stripped.count(b"[")
    keys = stripped.count(b":")
    slots = stripped.count(b",") + containers
    payload = len(body) - len(stripped) + 2 * strings
    del stripped
    if containers > _CONTAINERS_PER_ITEM * max_items + _CONTAINERS_PER_JOB:
        raise invalid(
            "items",
            f"the body holds {containers:,} JSON objects and arrays: more than a job of "
            f"{max_items:,} items (the most one job may hold) can have; split it into several jobs",
        )
    numbers = max(0, slots - strings - containers)
    cost = (
        containers * _CONTAINER
        + slots * _SLOT
        + keys * _ENTRY
        + (strings - keys) * _STRING
        + payload
        + numbers * _NUMBER
    )
    if cost > max(DENSITY * len(body), FLOOR_BYTES):
        raise Problem(
            413,
            "The request body is too large",
            f"The body's {slots:,} JSON values would take about {cost // 2**20:,} MB to hold, "
            f"more than {DENSITY}x its {len(body):,} bytes; a job has far fewer, larger values.",
            extra={"values": slots},
        )
    return keys


def load(body: bytes | bytearray | memoryview, keys: int) -> Any:
    """Parse the body; ``keys`` is what :func:`prescan` counted, to find duplicated keys."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise malformed(
            f"The body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(byte {exc.pos}).",
            extra={"line": exc.lineno, "column": exc.colno, "position": exc.pos},
        ) from None
    except TypeError:
        raise malformed("The body must be bytes of JSON text.") from None
    if _count_keys(doc) != keys:
        found = _first_duplicate(body)
        if found is not None:
            path, key, index = found
            raise invalid(path, f"the key '{key}' appears more than once in this object", index)
    return doc


def _count_keys(doc: Any) -> int:
    """Keys of every object in the document (an explicit stack: nesting depth is the caller's)."""
    total, stack = 0, [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            total += len(value)
            stack.extend(v for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend(v for v in value if isinstance(v, dict | list))
    return total


class _Marked(dict[str, Any]):
    """An object of the slow parse that remembers the first key it saw twice."""

    duplicate: str | None = None


def _first_duplicate(body: bytes | bytearray | memoryview) -> tuple[str, str, int | None] | None:
    """(field path, key, item index) of the first repeated key in document order; the slow
    path, taken only for a body that has one."""

    def pairs(items: list[tuple[str, Any]]) -> _Marked:
        obj = _Marked()
        for key, value in items:
            if key in obj and obj.duplicate is None:
                obj.duplicate = key
            obj[key] = value
        return obj

    try:
        doc = json.loads(bytes(body).decode("utf-8"), object_pairs_hook=pairs)
    except ValueError:
        return None
    stack: list[tuple[Any, str, int | None]] = [(doc, "", None)]
    while stack:
        value, path, index = stack.pop()
        if isinstance(value, _Marked):
            if value.duplicate is not None:
                key = clip(value.duplicate, 64)
                return (f"{path}.{key}" if path else key), key, index
            children = [(v, f"{path}.{k}" if path else k, index) for k, v in value.items()]
        elif isinstance(value, list):
            children = [
                (v, f"{path}[{i}]", i if path in ("items", "rows") else index)
                for i, v in enumerate(value)
            ]
        else:
            continue
        stack.extend(reversed(children))
    return None
