"""Job intake: parse and validate a submitted job into exactly what the pipeline sends upstream.

Owns the job body (JSON, ``POST /v1/jobs``) and the catalog form (CSV, ``Content-Type: text/csv``)
and turns either into a :class:`JobSpec`: one model, a mode, labels, a budget, a webhook, and one
:class:`ItemSpec` per image request, each holding the upstream endpoint and request body.

This module is the public face of job parsing: the two entry points, and the types and limits
callers import from here. The work is done by the modules beside it: :mod:`~service.jobs.schema`
(the field lists, limits and the JobSpec / ItemSpec types), :mod:`~service.jobs.builder` (the
job and its items), :mod:`~service.jobs.params` (one parameter value, references, URLs),
:mod:`~service.jobs.template` (templates) and :mod:`~service.jobs.csvform` (the CSV document).

Failure semantics: the whole job is validated before anything is accepted, and every rejection
is a :class:`service.errors.Problem` naming the field and, for an item, its index and id. No
input makes these functions raise anything else (the tests fuzz them to hold that). A body that
cannot be read (malformed JSON or CSV, not UTF-8) is a 400; a readable body with wrong content is
a 422 that lists up to ``MAX_FIELD_ERRORS`` field errors and counts the rest.

The JSON job body::

    model         catalog model id (default: the catalog's default_model)
    mode          "batch" (default) | "sync" | "auto"
    defaults      {size, quality, output_format, n, background, output_compression, moderation}
    items         [{id?, prompt, images?, mask?, <any defaults field to override it>}]
    template      "...{column}..." with rows [{column: value, id?, images?, mask?}] instead of items
    labels        {key: value}: at most 16; keys [a-z0-9_.-]{1,63}; values strings of <= 256 chars
    max_cost_usd  number, 0 < x <= 1e9 (nano-dollar budgets stay inside Redis's 64-bit integers)
    webhook_url   http(s) URL of at most 2048 characters
    reuse         "auto" (default): items whose image the tenant already has are copied, not
                  made again (service.jobs.reuse); "never": every item is generated

Rules worth knowing:

* ``null`` anywhere means "not given" (an item's ``"quality": null`` inherits the default).
* Unknown fields are errors, at every level: a typo must never be silently ignored.
* An item ``id`` is ``[A-Za-z0-9._-]{1,128}`` (a JSON integer is taken as its decimal string),
  unique in the job; without one an item's id is its 0-based index as a string.
* An item with ``images`` (1-16 references, optionally a ``mask``) is an edit. A reference is
  ``s3://bucket/key``, ``https://...``, ``data:image/...;base64,...``, an upstream file id
  ``file-...``, or ``file:///abs/path`` (local storage). References are kept as given; the
  pipeline turns them into upstream ``image_url`` / ``file_id`` objects.
* Template rows: every column fills ``{column}`` placeholders (``{{`` and ``}}`` are literal
  braces). Only ``id``, ``images`` and ``mask`` are taken from a row as item fields; every other
  column is template data, so a catalog column called ``size`` or ``quality`` (a product's size)
  never changes the image request. Per-item overrides need ``items``.
* CSV: the header row names the columns; a UTF-8 BOM is skipped; other job fields are query
  parameters (see :func:`parse_job_csv`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from service.catalog import Catalog
from service.errors import invalid
from service.jobs import jsonbody
from service.jobs.builder import JobBuilder
from service.jobs.csvform import csv_document
from service.jobs.messages import json_type
from service.jobs.params import JobScope
from service.jobs.schema import (
    ALPHA_FORMATS,
    BACKGROUNDS,
    COMPRESSIBLE_FORMATS,
    CSV_PARAMS,
    DEFAULT_OUTPUT_FORMAT,
    ITEM_FIELDS,
    ITEM_ID_PATTERN,
    LABEL_KEY_PATTERN,
    MAX_COST_USD,
    MAX_IMAGE_URL_CHARS,
    MAX_IMAGES,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_REF_URL_CHARS,
    MAX_WEBHOOK_URL_CHARS,
    MODERATIONS,
    MODES,
    PARAM_FIELDS,
    TOP_FIELDS,
    ItemSpec,
    JobSpec,
    Mode,
)
from service.models.lifecycle import ModelView

# The public face of job parsing: the entry points, and the types and limits callers use.
__all__ = [
    "ALPHA_FORMATS",
    "BACKGROUNDS",
    "COMPRESSIBLE_FORMATS",
    "CSV_PARAMS",
    "DEFAULT_OUTPUT_FORMAT",
    "ITEM_FIELDS",
    "ITEM_ID_PATTERN",
    "LABEL_KEY_PATTERN",
    "MAX_COST_USD",
    "MAX_IMAGES",
    "MAX_IMAGE_URL_CHARS",
    "MAX_LABELS",
    "MAX_LABEL_VALUE_CHARS",
    "MAX_N",
    "MAX_PROMPT_CHARS",
    "MAX_REF_URL_CHARS",
    "MAX_WEBHOOK_URL_CHARS",
    "MODERATIONS",
    "MODES",
    "PARAM_FIELDS",
    "TOP_FIELDS",
    "ItemSpec",
    "JobSpec",
    "Mode",
    "parse_job_csv",
    "parse_job_json",
]


# --------------------------------------------------------------------------------------------
# Entry points


def parse_job_json(
    body: bytes | bytearray | memoryview | str,
    catalog: Catalog,
    *,
    max_items: int,
    today: dt.date | None = None,
    models: ModelView | None = None,
    scope: JobScope | None = None,
    prompt_bytes: int | None = None,
) -> JobSpec:
    """Parse and validate a JSON job body. Raises :class:`Problem` (400, 413 or 422).

    ``models`` is the lifecycle view (upstream's shutdowns, learned batch support); without it
    the catalog's own dates are checked against ``today``. ``scope`` says where the tenant's
    references and webhook may point (None: their shape only); ``prompt_bytes`` caps what the
    prompts a template renders may add (None: no cap).
    """
    data = body.encode("utf-8") if isinstance(body, str) else body
    doc = jsonbody.load(data, max_items=max_items)
    del data, body  # the body may be freed now (the caller handed it over; see intake.Body)
    if not isinstance(doc, dict):
        raise invalid("", f"the body must be a JSON object (a job), not {json_type(doc)}")
    builder = JobBuilder(
        catalog,
        max_items=max_items,
        today=today,
        models=models,
        scope=scope,
        prompt_bytes=prompt_bytes,
    )
    return builder.build(doc)


def parse_job_csv(
    body: bytes | bytearray | memoryview,
    params: Mapping[str, str],
    catalog: Catalog,
    *,
    max_items: int,
    today: dt.date | None = None,
    models: ModelView | None = None,
    scope: JobScope | None = None,
    prompt_bytes: int | None = None,
) -> JobSpec:
    """Parse and validate a CSV catalog: one row per item. Raises :class:`Problem` (400 or 422).

    ``params`` are the query parameters:

    * ``template``: the prompt, with ``{column}`` placeholders. Without it a ``prompt`` column is
      the prompt.
    * ``model``, ``mode``, ``size``, ``quality``, ``output_format``, ``n``, ``background``,
      ``output_compression``, ``moderation``, ``max_cost_usd``, ``webhook_url``: as in the JSON
      body (the image parameters apply to every row).
    * ``labels`` as a JSON object, and/or ``label.<key>=<value>`` one per label.
    * ``id_column``: the column holding item ids (default ``id`` if present, else ``sku`` if
      present, else the row's 0-based index).
    * ``images_column`` / ``mask_column``: edit references (default ``images`` / ``mask`` if
      present). A cell holds one reference, or a JSON array of them; an empty cell means none.
    * ``delimiter``: ``,`` (default), ``;``, ``|`` or ``tab``.
    """
    builder = JobBuilder(
        catalog,
        max_items=max_items,
        today=today,
        csv_form=True,
        models=models,
        scope=scope,
        prompt_bytes=prompt_bytes,
    )
    doc, rows = csv_document(body, params, builder.errors, max_items=max_items)
    del body  # the rows hold it now, and let go of it once read (see intake.Body)
    return builder.build(doc, csv_rows=rows)
