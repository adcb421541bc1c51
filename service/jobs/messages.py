"""How intake's error messages show what a caller sent.

Owns the wording helpers every part of job parsing shares: a caller's value shown clipped and
escaped (a message must stay small and printable whatever was sent), a JSON value named by its
type as the caller wrote it, and the "did you mean" hint for an unknown field.

Failure semantics: none. These functions accept any value and always return a string.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import orjson


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {show(value)}"
    if isinstance(value, str):
        return f"the string {show(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON, shortened: messages must stay small whatever the caller sent."""
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit] + "…"
        return "'" + text.encode("unicode_escape").decode("ascii") + "'"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "a very large number"
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def clip_key(key: str) -> str:
    return clip(str(key), 64)


def unknown_message(key: str, known: Iterable[str], where: str) -> str:
    close = difflib.get_close_matches(str(key)[:64], list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field {show(key)} in {where}{hint}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown_id(raw: Any, index: int) -> str | None:
    """The id to name in an error when the item's id itself is not usable."""
    if raw is None:
        return str(index)
    if isinstance(raw, str):
        return clip(raw, 128)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return show(raw)
    return None
