"""Errors: the one base every imagebatch error derives from, and the refusals callers see.

:class:`ImagebatchError` says whether retrying later can help (``transient``): tasks retry
transient errors with backoff and fail fast on the rest; every layer that talks to the outside
(upstream, storage) translates its vendor's exceptions into these, so no caller ever imports
``openai`` or ``botocore`` to decide what to do.

:class:`Problem` is a refusal of a caller's request, rendered as ``application/problem+json``
(RFC 9457) by the API: it names the field and, for an item, its index and id. Intake raises it;
the API turns it into the response. A job of 50,000 items that are all wrong must still answer
small, so :class:`FieldErrors` keeps only the first :data:`MAX_FIELD_ERRORS` and counts the rest
(``errors_omitted`` in the body).

Status codes: 400 for a body that cannot be read at all (malformed JSON or CSV, not UTF-8), 422
for a well-formed body whose content is wrong, 413 for a body over the size limit, 401, 404, 409
and 415 for their usual meanings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class ImagebatchError(Exception):
    """Base of imagebatch's own errors."""

    #: Whether retrying later can help (a task retries these with backoff).
    transient: bool = False


class TransientError(ImagebatchError):
    """Failed now, may work later: upstream or storage unavailable, throttled, timed out."""

    transient = True


class PermanentError(ImagebatchError):
    """Retrying cannot help: a refusal, a missing object, a model upstream does not serve."""


PROBLEM_CONTENT_TYPE = "application/problem+json"

# Problem type URIs: stable identifiers a client can branch on (RFC 9457 §3.1.1).
PROBLEM_BASE = "https://imagebatch.dev/problems/"
TYPE_VALIDATION = PROBLEM_BASE + "validation"
TYPE_MALFORMED = PROBLEM_BASE + "malformed-body"
TYPE_TOO_LARGE = PROBLEM_BASE + "body-too-large"
TYPE_UNSUPPORTED_MEDIA = PROBLEM_BASE + "unsupported-media-type"
TYPE_NOT_FOUND = PROBLEM_BASE + "not-found"
TYPE_UNAUTHORIZED = PROBLEM_BASE + "unauthorized"
TYPE_CONFLICT = PROBLEM_BASE + "conflict"

# The type of a problem raised without one: by status; anything else is RFC 9457's about:blank.
_TYPE_BY_STATUS = {
    400: TYPE_MALFORMED,
    401: TYPE_UNAUTHORIZED,
    404: TYPE_NOT_FOUND,
    409: TYPE_CONFLICT,
    413: TYPE_TOO_LARGE,
    415: TYPE_UNSUPPORTED_MEDIA,
    422: TYPE_VALIDATION,
}

# Field errors listed in one response; the rest are only counted, so an all-bad 50k-item job
# answers in a few kilobytes.
MAX_FIELD_ERRORS = 100


@dataclass(slots=True)
class FieldError:
    """One thing wrong with one field.

    ``field`` is a path such as ``"model"``, ``"defaults.quality"`` or ``"items[3].size"``;
    ``index`` and ``id`` name the item (0-based position and the caller's id) when the field
    belongs to one.
    """

    field: str
    message: str
    index: int | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "message": self.message, "index": self.index, "id": self.id}

    def sentence(self) -> str:
        """The error as a sentence of its own, for a problem's ``detail``."""
        if not self.field and self.index is None:
            return self.message[:1].upper() + self.message[1:]
        where = self.field or "the body"
        if self.index is not None:
            # The field path already holds the index; the id is what the caller searches for.
            if self.id is not None:
                where = f"{where} (item {self.index}, id '{self.id}')"
            else:
                where = f"{where} (item {self.index})"
        return f"{where}: {self.message}"


class Problem(PermanentError):
    """An error response: raise it anywhere below a route, the route answers with it."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type_: str | None = None,
        errors: list[FieldError] | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type_ or _TYPE_BY_STATUS.get(status, "about:blank")
        self.extra = dict(extra or {})
        errors = list(errors or [])
        if len(errors) > MAX_FIELD_ERRORS:
            omitted = len(errors) - MAX_FIELD_ERRORS
            self.extra["errors_omitted"] = self.extra.get("errors_omitted", 0) + omitted
            errors = errors[:MAX_FIELD_ERRORS]
        self.errors = errors
        # Response headers that belong with this problem (WWW-Authenticate on 401).
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": [e.to_dict() for e in self.errors],
        }
        body.update(self.extra)
        return body

    def __repr__(self) -> str:
        return f"Problem({self.status}, {self.title!r}, {self.detail!r}, errors={len(self.errors)})"


class FieldErrors:
    """Collects field errors: keeps the first :data:`MAX_FIELD_ERRORS`, counts all of them."""

    __slots__ = ("_kept", "count")

    def __init__(self) -> None:
        self._kept: list[FieldError] = []
        self.count = 0

    def add(
        self, field: str, message: str, index: int | None = None, id: str | None = None
    ) -> None:
        self.count += 1
        if len(self._kept) < MAX_FIELD_ERRORS:
            self._kept.append(FieldError(field, message, index, id))

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[FieldError]:
        return iter(self._kept)

    def raise_if_any(self, status: int = 422) -> None:
        if self.count:
            raise validation_problem(self._kept, total=self.count, status=status)


def validation_problem(
    errors: list[FieldError], *, total: int | None = None, status: int = 422
) -> Problem:
    """A 422 (or 400) naming the first error in ``detail`` and listing them all.

    ``total`` is how many errors there were when ``errors`` holds only the first of them.
    """
    if not errors:
        raise ValueError("validation_problem needs at least one error")
    total = max(total or 0, len(errors))
    kept = errors[:MAX_FIELD_ERRORS]
    detail = errors[0].sentence()
    if not detail.endswith("."):
        detail += "."
    if total > 1:
        others = total - 1
        detail += f" ({others:,} more problem{'s' if others != 1 else ''} listed in errors.)"
    extra = {"errors_omitted": total - len(kept)} if total > len(kept) else None
    if status == 400:
        title, type_ = "The request body could not be read", TYPE_MALFORMED
    else:
        title, type_ = "The job is not valid", TYPE_VALIDATION
    return Problem(status, title, detail, type_=type_, errors=kept, extra=extra)


def invalid(field: str, message: str, index: int | None = None, id: str | None = None) -> Problem:
    """A 422 about a single field."""
    return validation_problem([FieldError(field, message, index, id)])


def malformed(detail: str, *, field: str = "", extra: dict[str, Any] | None = None) -> Problem:
    """A 400: the body cannot be read at all (bad JSON or CSV, wrong encoding)."""
    return Problem(
        400,
        "The request body could not be read",
        detail,
        type_=TYPE_MALFORMED,
        errors=[FieldError(field, detail)],
        extra=extra,
    )


def body_too_large(limit_bytes: int) -> Problem:
    """A 413: the body is over the configured size limit."""
    return Problem(
        413,
        "The request body is too large",
        f"The request body is larger than the limit of {limit_bytes:,} bytes; split the job.",
        type_=TYPE_TOO_LARGE,
        extra={"limit_bytes": limit_bytes},
    )


def too_large(field: str, detail: str) -> Problem:
    """A 413 naming what made the request too large (a body, the prompts a template renders)."""
    return Problem(
        413,
        "The request body is too large",
        detail,
        type_=TYPE_TOO_LARGE,
        errors=[FieldError(field, detail)],
    )


def unsupported_media_type(got: str | None, accepted: tuple[str, ...]) -> Problem:
    """A 415: a content type intake does not read."""
    return Problem(
        415,
        "Unsupported media type",
        f"Content-Type '{got or ''}' is not accepted here; send {' or '.join(accepted)}.",
        type_=TYPE_UNSUPPORTED_MEDIA,
        extra={"accepted": list(accepted)},
    )


def not_found(what: str, ident: str) -> Problem:
    """A 404 for ``what`` (e.g. "job") ``ident``."""
    return Problem(
        404,
        f"No such {what}",
        f"There is no {what} '{ident}' (or it belongs to another tenant).",
        type_=TYPE_NOT_FOUND,
    )


def unauthorized(
    detail: str = "A valid 'Authorization: Bearer <key>' header is required.",
) -> Problem:
    """A 401 with the ``WWW-Authenticate`` challenge RFC 9110 §11.6.1 asks for."""
    return Problem(
        401,
        "Unauthorized",
        detail,
        type_=TYPE_UNAUTHORIZED,
        headers={"WWW-Authenticate": 'Bearer realm="imagebatch"'},
    )


def conflict(detail: str, *, extra: dict[str, Any] | None = None) -> Problem:
    """A 409: the request contradicts the current state (e.g. an Idempotency-Key reused)."""
    return Problem(409, "Conflict", detail, type_=TYPE_CONFLICT, extra=extra)
