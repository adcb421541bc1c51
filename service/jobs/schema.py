"""The shape of a job: its field names, accepted values and limits, and what intake produces.

Owns the vocabulary every part of job parsing checks against (the field lists, the enumerations,
the upstream limits and our own) and the validated result: a :class:`JobSpec` holding one
:class:`ItemSpec` per image request (held compactly by an :class:`ItemList` when intake made
them). The job body itself is described in
:mod:`service.jobs.spec`, which parses it into these types.

Failure semantics: nothing here validates. :meth:`ItemSpec.from_dict` reads back a job that was
already accepted and trusts it; a damaged record raises as Python does (``KeyError``,
``ValueError``).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import orjson

from service.catalog import EDITS, GENERATIONS, Catalog

Mode = Literal["batch", "sync", "auto"]

MODES: tuple[str, ...] = ("batch", "sync", "auto")
BACKGROUNDS: tuple[str, ...] = ("auto", "opaque", "transparent")
MODERATIONS: tuple[str, ...] = ("auto", "low")
# Result reuse (service.jobs.reuse): "auto" completes items whose image the tenant already has
# by copying it; "never" generates every item.
REUSE_MODES: tuple[str, ...] = ("auto", "never")
# Formats that carry an alpha channel (a transparent background needs one; facts §3.1).
ALPHA_FORMATS: tuple[str, ...] = ("png", "webp")
# Formats that take output_compression (facts §3.1: jpeg and webp only).
COMPRESSIBLE_FORMATS: tuple[str, ...] = ("jpeg", "webp")
DEFAULT_OUTPUT_FORMAT = "png"

# Upstream limits (facts §3.1, §1.1).
MAX_PROMPT_CHARS = 32_000
MAX_N = 10
MAX_IMAGES = 16
MAX_IMAGE_URL_CHARS = 20_971_520
# Our own limits.
MAX_LABELS = 16  # the upstream batch metadata holds 16 pairs too
MAX_LABEL_VALUE_CHARS = 256
MAX_WEBHOOK_URL_CHARS = 2048
MAX_REF_URL_CHARS = 8192  # presigned URLs run long
# Budgets are kept in integer nano-dollars in Redis (64-bit): 1e9 USD is 1e18 nano-USD < 2**63.
MAX_COST_USD = 1e9
ITEM_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"
LABEL_KEY_PATTERN = r"[a-z0-9_.-]{1,63}"

# Image request parameters: settable in ``defaults`` and per item.
PARAM_FIELDS: tuple[str, ...] = (
    "size",
    "quality",
    "output_format",
    "n",
    "background",
    "output_compression",
    "moderation",
)
TOP_FIELDS: tuple[str, ...] = (
    "model",
    "mode",
    "defaults",
    "items",
    "template",
    "rows",
    "labels",
    "max_cost_usd",
    "webhook_url",
    "reuse",
    "deadline",
    "on_deadline",
)
ITEM_FIELDS: tuple[str, ...] = ("id", "prompt", "images", "mask", *PARAM_FIELDS)
# Query parameters of the CSV form besides the job fields.
CSV_PARAMS: tuple[str, ...] = (
    "template",
    "id_column",
    "images_column",
    "mask_column",
    "delimiter",
    "model",
    "mode",
    *PARAM_FIELDS,
    "labels",
    "max_cost_usd",
    "webhook_url",
    "reuse",
    "deadline",
    "on_deadline",
)


# --------------------------------------------------------------------------------------------
# What intake produces


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """One image request of a job: where it goes upstream and the exact body it sends."""

    index: int  # position in the job (0-based)
    id: str  # the caller's key; str(index) when the caller gave none
    endpoint: str  # GENERATIONS or EDITS
    # The upstream request body: model, prompt, the parameters that were set (by the job's
    # defaults or the item), and for edits `images` / `mask` as the caller gave them.
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def prompt(self) -> str:
        return str(self.body["prompt"])

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))

    @property
    def output_format(self) -> str:
        return str(self.body.get("output_format", DEFAULT_OUTPUT_FORMAT))

    @property
    def size(self) -> str | None:
        return self.body.get("size")

    @property
    def quality(self) -> str | None:
        return self.body.get("quality")

    @property
    def images(self) -> list[str]:
        return list(self.body.get("images", ()))

    @property
    def is_edit(self) -> bool:
        return self.endpoint == EDITS

    def to_dict(self) -> dict[str, Any]:
        """The item as one line of ``request.jsonl``."""
        return {"index": self.index, "id": self.id, "endpoint": self.endpoint, "body": self.body}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ItemSpec:
        """The inverse of :meth:`to_dict` (reading back an accepted job; not a validator)."""
        return cls(int(raw["index"]), str(raw["id"]), str(raw["endpoint"]), dict(raw["body"]))


# The size of an ItemList's segments (and of the parser's: service.jobs.jsonbody).
_SEGMENT_BYTES = 1024 * 1024
# An ItemList line starting with one of these is JSON; any other is a prompt as it is.
_JSON_STARTS = ('"', "[")


def _record(line: bytes | bytearray) -> list[Any]:
    """An ItemList line as its record ``[id, edit, prompt, ...]`` (see :class:`ItemList`)."""
    if line[:1] == b"[":
        record: list[Any] = orjson.loads(line)
        return record
    prompt = orjson.loads(line) if line[:1] == b'"' else line.decode()
    return [None, 0, prompt]


def item_ids(items: Sequence[ItemSpec]) -> Iterator[str]:
    """The ids of ``items``, in order (cheaply for an :class:`ItemList`)."""
    if isinstance(items, ItemList):
        return items.ids()
    return (item.id for item in items)


def image_count(items: Sequence[ItemSpec]) -> int:
    """The images ``items`` ask for (the sum of their ``n``)."""
    return items.images if isinstance(items, ItemList) else sum(item.n for item in items)


class ItemList(Sequence[ItemSpec]):
    """A job's validated items, held as compact text: a few buffers, no object per item.

    What intake builds and keeps while it estimates and stores a job. An item is its own part of
    the request (id, prompt, the parameters it set itself, its references), one line of text; the
    model and the job's defaults are held once. Reading an item (iterating, indexing) builds its
    :class:`ItemSpec` then, with the same body a list of ItemSpec would hold, so 100,000 items
    cost about their text, not a dict and a dozen strings each.

    An item's index is its place in the list: items are appended in order, none left out (a job
    with a refused item is refused whole, so intake stops keeping items at its first error). A
    line is the JSON array ``[id, edit, prompt, overrides, images, mask]`` (trailing nulls left
    out, the id null when it is the item's index); the commonest item, a prompt with nothing
    else, is its prompt alone: as it is, or as a JSON string when it starts like JSON or holds a
    newline. The lines are kept in segments of about :data:`_SEGMENT_BYTES`, the size of the
    parser's own (:class:`~service.jobs.jsonbody.RawSeq`): the memory the parser lets go of as it
    is read is what the items are written into. Items are meant to be read in order; reading one
    by its index scans its segment.
    """

    __slots__ = ("_count", "_firsts", "_segments", "defaults", "images", "model")

    def __init__(self, model: str, defaults: Mapping[str, Any]) -> None:
        self.model = model
        self.defaults = dict(defaults)
        self._segments: list[bytearray] = [bytearray()]
        self._firsts: array[int] = array("I", [0])  # the first item of each segment
        self._count = 0
        self.images = 0  # images the items ask for (the sum of their n)

    def append(
        self,
        index: int,
        item_id: str,
        endpoint: str,
        prompt: str,
        overrides: Mapping[str, Any] | None = None,
        images: list[str] | None = None,
        mask: str | None = None,
    ) -> None:
        """Add item ``index`` (the next one): ``overrides`` are the parameters it sets over the
        defaults."""
        if index != self._count:
            raise ValueError(f"item {index} appended as item {self._count}: out of order")
        edit = 1 if endpoint == EDITS else 0
        given = None if item_id == str(index) else item_id
        record = [given, edit, prompt, overrides or None, images, mask]
        while record[-1] is None:
            record.pop()  # trailing nulls left out
        segment = self._segments[-1]
        if len(segment) >= _SEGMENT_BYTES:
            segment = bytearray()
            self._segments.append(segment)
            self._firsts.append(self._count)
        if len(record) == 3 and given is None and not edit:
            if prompt[:1] in _JSON_STARTS or "\n" in prompt:
                segment += orjson.dumps(prompt)
            else:
                segment += prompt.encode()
        else:
            segment += orjson.dumps(record)
        segment += b"\n"
        self._count += 1
        n = overrides.get("n") if overrides else None
        self.images += int(n if n is not None else self.defaults.get("n", 1))

    def ids(self) -> Iterator[str]:
        """The items' ids, in order (without building the items)."""
        return (
            str(index) if record[0] is None else record[0]
            for index, record in enumerate(self._records())
        )

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """What the items' text and offsets take."""
        text = sum(len(segment) for segment in self._segments)
        return text + self._firsts.itemsize * len(self._firsts)

    @overload
    def __getitem__(self, i: int) -> ItemSpec: ...
    @overload
    def __getitem__(self, i: slice) -> list[ItemSpec]: ...
    def __getitem__(self, i: int | slice) -> ItemSpec | list[ItemSpec]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("item index out of range")
        s = bisect.bisect_right(self._firsts, i) - 1
        segment, start = self._segments[s], 0
        for _ in range(i - self._firsts[s]):
            start = segment.index(b"\n", start) + 1
        line = segment[start : segment.index(b"\n", start)]
        return self._item(i, _record(line))

    def __iter__(self) -> Iterator[ItemSpec]:
        return (self._item(index, record) for index, record in enumerate(self._records()))

    def _records(self) -> Iterator[list[Any]]:
        for segment in self._segments:
            start = 0
            while (end := segment.find(b"\n", start)) >= 0:
                # A copy of the line, not a view: a view left open would pin the buffer.
                yield _record(segment[start:end])
                start = end + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<ItemList of {len(self)} items, {self.nbytes:,} bytes>"

    def _item(self, index: int, record: list[Any]) -> ItemSpec:
        if len(record) < 6:
            record += [None] * (6 - len(record))
        given, edit, prompt, overrides, images, mask = record
        item_id = str(index) if given is None else given
        # The body in the order intake has always written it: model, prompt, the parameters
        # (defaults first, then what the item added), the references.
        body: dict[str, Any] = {"model": self.model, "prompt": prompt}
        body.update(self.defaults)
        if overrides:
            body.update(overrides)
        if images is not None:
            body["images"] = images
            if mask is not None:
                body["mask"] = mask
        return ItemSpec(index, item_id, EDITS if edit else GENERATIONS, body)


@dataclass(frozen=True)
class JobSpec:
    """A validated job: intake validates the whole job before accepting it. ``items`` is an
    :class:`ItemList` when intake made it (any sequence of ItemSpec otherwise)."""

    model: str
    mode: Mode
    labels: dict[str, str]
    max_cost_usd: float | None
    webhook_url: str | None
    items: Sequence[ItemSpec]
    # Things the caller should know that do not stop the job (e.g. an upcoming shutdown).
    warnings: tuple[str, ...] = field(default=())
    reuse: str = "auto"  # one of REUSE_MODES
    deadline: float | None = None  # unix time (service.jobs.deadline)
    on_deadline: str = "wait"  # one of service.jobs.deadline.ON_DEADLINE

    def lane(
        self, catalog: Catalog, sync_max_items: int, batch_capable: bool | None = None
    ) -> Literal["batch", "sync"]:
        """Where the job runs: ``auto`` is sync up to ``sync_max_items`` items, or whenever the
        model has no Batch API support (intake refuses such a model only in ``batch`` mode).

        ``batch_capable`` is what is known of the model now (the catalog, and a refusal learned
        from upstream: :mod:`service.models.capability`); None = the catalog's word alone."""
        if self.mode == "sync":
            return "sync"
        if self.mode == "batch":
            return "batch"
        model = catalog.get(self.model)
        if batch_capable is None:
            batch_capable = model is not None and model.batch
        if len(self.items) <= sync_max_items or model is None or not batch_capable:
            return "sync"
        return "batch"
