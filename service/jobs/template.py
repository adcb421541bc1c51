"""Prompt templates: ``"Studio photo of a {color} {title}"`` filled from each row of a job.

Owns the template syntax (``{column}`` placeholders; ``{{`` and ``}}`` are literal braces),
compiling a template once per job into literal and placeholder parts, and rendering it for one
row (strings as they are, numbers in decimal, booleans as ``true`` / ``false``).

Failure semantics: errors are added to the job's :class:`FieldErrors` and the function returns
``None``; nothing raises. A malformed template is reported once, on ``template``; a row that
lacks a placeholder's value or holds a value of the wrong type is reported on that row.
"""

from __future__ import annotations

import re
from typing import Any

from service.errors import FieldErrors
from service.jobs.messages import clip, clip_key, json_type

_TEMPLATE_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def compile_template(template: str, errs: FieldErrors) -> list[str] | None:
    """Split a template into [literal, name, literal, name, ..., literal]; None if malformed."""
    parts: list[str] = []
    literal: list[str] = []
    pos = 0
    for m in _TEMPLATE_TOKEN_RE.finditer(template):
        literal.append(template[pos : m.start()])
        token = m.group(0)
        pos = m.end()
        if token == "{{":
            literal.append("{")
        elif token == "}}":
            literal.append("}")
        elif m.group(1) is not None:
            name = m.group(1)
            if not name:
                errs.add("template", f"empty placeholder {{}} at position {m.start()}")
                return None
            parts.append("".join(literal))
            parts.append(name)
            literal = []
        else:
            errs.add(
                "template",
                f"unmatched '{token}' at position {m.start()}; write '{token}{token}' for a "
                f"literal brace",
            )
            return None
    literal.append(template[pos:])
    parts.append("".join(literal))
    return parts


def render_template(
    parts: list[str],
    row: dict[str, Any],
    path: str,
    index: int,
    item_id: str | None,
    where: str,
    errs: FieldErrors,
) -> str | None:
    """Fill the placeholders of a compiled template from ``row``; None (reported) on a gap.

    ``where`` ends the missing-value message: the CSV line, or nothing for JSON rows.
    """
    if len(parts) == 3 and not parts[0] and not parts[2] and isinstance(row.get(parts[1]), str):
        return str(row[parts[1]])  # "{prompt}": the value itself, not a copy of it
    out = [parts[0]]
    for k in range(1, len(parts), 2):
        name = parts[k]
        value = row.get(name)
        if value is None:
            errs.add(
                path,
                f"row {index} has no value for template placeholder {{{clip(name, 64)}}}{where}",
                index,
                item_id,
            )
            return None
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, (int, float)):
            out.append(str(value))
        else:
            errs.add(
                f"{path}.{clip_key(name)}",
                f"a template value must be a string or number, not {json_type(value)}",
                index,
                item_id,
            )
            return None
        out.append(parts[k + 1])
    return "".join(out)
