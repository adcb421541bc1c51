"""Validates one job document into a :class:`JobSpec`: the job's fields, then every item.

Owns the rules of a job as a whole: unknown fields, the model (known, not shut down, with a
warning when it soon will be), mode, labels, budget, webhook, the defaults, items or template
rows (not both), item ids (well-formed, unique), prompts, edit references and what the model
offers. The checks of one parameter value come from :mod:`service.jobs.params`, the template
from :mod:`service.jobs.template`, and a CSV job's rows from :mod:`service.jobs.csvform`.

Failure semantics: a :class:`JobBuilder` validates one job. It collects every error it finds in
the job's :class:`FieldErrors` (shared with the CSV reader for a CSV job; the first
``MAX_FIELD_ERRORS`` kept, all counted) and :meth:`JobBuilder.build` raises them together as
one 422 :class:`Problem`; it returns a :class:`JobSpec` only when nothing was wrong.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

from service.catalog import EDITS, GENERATIONS, Catalog, Model
from service.errors import FieldErrors, too_large
from service.jobs import deadline
from service.jobs.csvform import MISSING, CsvRows, RowSeq, csv_refs
from service.jobs.idindex import IdIndex
from service.jobs.jsonbody import RawSeq
from service.jobs.messages import (
    clip,
    clip_key,
    is_number,
    json_type,
    show,
    unknown_message,
)
from service.jobs.messages import shown_id as shown_id_of
from service.jobs.params import (
    COMBO_PARAMS,
    JobScope,
    combo_problem,
    images_check,
    param_problem,
    ref_check,
    url_problem,
)
from service.jobs.schema import (
    ITEM_FIELDS,
    ITEM_ID_PATTERN,
    LABEL_KEY_PATTERN,
    MAX_COST_USD,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_PROMPT_CHARS,
    MODES,
    PARAM_FIELDS,
    REUSE_MODES,
    TOP_FIELDS,
    ItemList,
    JobSpec,
    Mode,
)
from service.jobs.template import compile_template, render_template
from service.models.lifecycle import ModelView, catalog_state

_ID_RE = re.compile(ITEM_ID_PATTERN + r"\Z")
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN + r"\Z")

_PARAMS = frozenset(PARAM_FIELDS)
_ITEM_FIELDS = frozenset(ITEM_FIELDS)
_TOP_FIELDS = frozenset(TOP_FIELDS)


class JobBuilder:
    """Validates one job; collects every error and raises them together."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_items: int,
        today: dt.date | None,
        csv_form: bool = False,
        models: ModelView | None = None,
        scope: JobScope | None = None,
        prompt_bytes: int | None = None,
    ) -> None:
        self.catalog = catalog
        # The catalog merged with upstream's lifecycle and learned batch support; None = the
        # catalog alone (its own shutdown dates against ``today``).
        self.models = models
        self.max_items = max_items
        self.today = today
        self.csv_form = csv_form
        # Where this tenant's references and webhook may point; None checks only their shape.
        self.scope = scope
        # What rendered template prompts may add up to (they count against the body's budget).
        self.prompt_bytes = prompt_bytes
        self.errors = FieldErrors()
        self.model: Model | None = None
        self.model_id = ""
        self.warnings: list[str] = []
        # Per-(field, type, value) verdicts: 50k items repeat the same few override values.
        self._param_cache: dict[tuple[str, type, Any], str | None] = {}
        # CSV: row index -> CSV line number, for messages.
        self.row_lines: Sequence[int] | None = None

    # -- the job ----------------------------------------------------------------------------

    def defaults_path(self, name: str) -> str:
        # In the CSV form the defaults are query parameters and are named as such.
        return name if self.csv_form else f"defaults.{name}"

    def build(self, doc: dict[str, Any], csv_rows: CsvRows | None = None) -> JobSpec:
        errs = self.errors
        for key in doc:
            if key not in _TOP_FIELDS:
                errs.add(clip_key(key), unknown_message(key, TOP_FIELDS, "the job"))

        self._check_model(doc.get("model"))
        mode = self._check_mode(doc.get("mode"))
        labels = self._check_labels(doc.get("labels"))
        max_cost = self._check_max_cost(doc.get("max_cost_usd"))
        webhook = self._check_webhook(doc.get("webhook_url"))
        defaults = self._check_defaults(doc.get("defaults"))
        reuse = doc.get("reuse") or "auto"
        if not isinstance(reuse, str) or reuse not in REUSE_MODES:
            errs.add("reuse", f"reuse must be one of {', '.join(REUSE_MODES)}, not {show(reuse)}")
            reuse = "auto"
        timing = deadline.fields(doc, errs)

        items = ItemList(self.model_id, defaults)
        has_items = doc.get("items") is not None
        has_template = doc.get("template") is not None or doc.get("rows") is not None
        if csv_rows is not None:
            self._rows(items, doc.get("template"), csv_rows.rows, defaults, csv_rows)
        elif has_items and has_template:
            errs.add("items", "give either items, or template with rows, not both")
        elif has_items:
            self._items(items, doc["items"], defaults)
        elif has_template:
            self._rows(items, doc.get("template"), doc.get("rows"), defaults, None)
        else:
            errs.add("items", "the job has no items: give items, or template with rows")

        errs.raise_if_any()
        return JobSpec(
            model=self.model_id,
            mode=mode,
            labels=labels,
            max_cost_usd=max_cost,
            webhook_url=webhook,
            items=items,
            warnings=tuple(self.warnings),
            reuse=reuse,
            **timing,
        )

    def _check_model(self, raw: Any) -> None:
        if raw is None:
            raw = self.catalog.default_model
        if not isinstance(raw, str):
            self.errors.add("model", f"model must be a string, not {json_type(raw)}")
            return
        model = self.catalog.get(raw)
        if model is None:
            if self.models is not None:
                live = self.models.live_ids()
            else:
                live = [
                    m.id for m in self.catalog.models.values() if not m.is_shut_down(self.today)
                ]
            close = difflib.get_close_matches(raw, live, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.errors.add(
                "model",
                f"unknown model {show(raw)}{hint}; known models: {', '.join(live[:8])}",
            )
            return
        state = self.models.get(model.id) if self.models is not None else None
        state = state or catalog_state(model, self.today)
        refusal, warning = state.refusal(), state.warning()
        if refusal:
            self.errors.add("model", refusal)
            return
        if warning:
            self.warnings.append(warning)
        self.model = model
        self.model_id = model.id

    def _check_mode(self, raw: Any) -> Mode:
        if raw is None:
            raw = "batch"
        if raw not in MODES or not isinstance(raw, str):
            self.errors.add("mode", f"mode must be one of {', '.join(MODES)}, not {show(raw)}")
            return "batch"
        if raw == "batch" and self.model is not None and not self.model.batch:
            self.errors.add(
                "model",
                f"model '{self.model.id}' does not support the Batch API; "
                f"use mode 'sync' (full price) for this model, or a model with batch support",
            )
        elif raw == "batch" and self.model is not None and self.models is not None:
            state = self.models.get(self.model.id)
            if state is not None and state.batch_refusal is not None:
                # Learned, and expiring: the job is taken, its items fail unless upstream
                # takes batches of the model again by the time they are submitted.
                self.warnings.append(
                    f"upstream refused batches of model '{self.model.id}' recently (it may not "
                    f"support the Batch API); this job's items will fail with "
                    f"model_not_batch_capable unless that changes: use mode 'auto' or 'sync'"
                )
        mode: Mode = raw  # type: ignore[assignment]
        return mode

    def _check_labels(self, raw: Any) -> dict[str, str]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.errors.add("labels", f"labels must be an object of strings, not {json_type(raw)}")
            return {}
        if len(raw) > MAX_LABELS:
            self.errors.add("labels", f"at most {MAX_LABELS} labels, got {len(raw)}")
            return {}
        labels: dict[str, str] = {}
        for key, value in raw.items():
            path = f"labels.{clip_key(key)}"
            if not _LABEL_KEY_RE.match(key):
                self.errors.add(path, f"a label key must match {LABEL_KEY_PATTERN}")
            elif not isinstance(value, str):
                self.errors.add(path, f"a label value must be a string, not {json_type(value)}")
            elif len(value) > MAX_LABEL_VALUE_CHARS:
                self.errors.add(
                    path,
                    f"a label value may be at most {MAX_LABEL_VALUE_CHARS} characters, "
                    f"got {len(value):,}",
                )
            else:
                labels[key] = value
        return labels

    def _check_max_cost(self, raw: Any) -> float | None:
        if raw is None:
            return None
        if not is_number(raw):
            self.errors.add("max_cost_usd", f"max_cost_usd must be a number, not {json_type(raw)}")
            return None
        try:
            value = float(raw)
        except OverflowError:
            value = math.inf
        if not (0 < value <= MAX_COST_USD):
            self.errors.add(
                "max_cost_usd",
                f"max_cost_usd must be more than 0 and at most {MAX_COST_USD:,.0f}, got {show(raw)}",
            )
            return None
        return value

    def _check_webhook(self, raw: Any) -> str | None:
        if raw is None:
            return None
        if not isinstance(raw, str):
            self.errors.add("webhook_url", f"webhook_url must be a string, not {json_type(raw)}")
            return None
        problem = url_problem(raw)
        if problem is None and self.scope is not None and self.scope.webhook is not None:
            problem = self.scope.webhook(raw)
        if problem:
            self.errors.add("webhook_url", problem)
            return None
        return raw

    def _check_defaults(self, raw: Any) -> dict[str, Any]:
        """The validated defaults (only the fields that were set, and valid)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.errors.add("defaults", f"defaults must be an object, not {json_type(raw)}")
            return {}
        defaults: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in _PARAMS:
                if key in _ITEM_FIELDS:
                    message = f"'{key}' is set per item and cannot be a default"
                else:
                    message = unknown_message(key, PARAM_FIELDS, "defaults")
                self.errors.add(self.defaults_path(clip_key(key)), message)
                continue
            if value is None:
                continue
            problem = self._param_problem(key, value)
            if problem is None:
                defaults[key] = value
            else:
                self.errors.add(self.defaults_path(key), problem)
        combo = combo_problem(defaults)
        if combo is not None:
            name, message = combo
            self.errors.add(self.defaults_path(name), message)
            # Keep the conflict from being reported again on every item that inherits it.
            defaults.pop(name, None)
        return defaults

    # -- parameters ---------------------------------------------------------------------------

    def _param_problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not acceptable for parameter ``name``, or None (cached)."""
        if isinstance(value, (str, int, float)) and (not isinstance(value, str) or len(value) < 64):
            key = (name, type(value), value)
            try:
                return self._param_cache[key]
            except KeyError:
                verdict = self._param_cache[key] = param_problem(name, value, self.model)
                return verdict
        return param_problem(name, value, self.model)

    # -- items --------------------------------------------------------------------------------

    def _count_ok(self, path: str, raw: Any, what: str) -> bool:
        if not isinstance(raw, list | RawSeq | RowSeq):
            self.errors.add(path, f"{path} must be an array of {what}, not {json_type(raw)}")
            return False
        if not raw:
            self.errors.add(path, "the job has no items")
            return False
        if len(raw) > self.max_items:
            self.errors.add(
                path,
                f"the job has {len(raw):,} items; a job may hold at most {self.max_items:,} "
                f"(split it into several jobs)",
            )
            return False
        return True

    def _items(self, out: ItemList, raw_items: Any, defaults: dict[str, Any]) -> None:
        if not self._count_ok("items", raw_items, "objects"):
            return
        seen = IdIndex(len(raw_items))
        errs = self.errors
        for index, raw in enumerate(_elements(raw_items)):
            path = f"items[{index}]"
            if not isinstance(raw, dict):
                errs.add(path, f"an item must be an object, not {json_type(raw)}", index)
                continue
            item_id = self._item_id(raw.get("id"), path, index, seen, "items")
            shown_id = item_id if item_id is not None else shown_id_of(raw.get("id"), index)
            overrides: dict[str, Any] | None = None
            ok = True
            for key, value in raw.items():
                if key in _PARAMS:
                    if value is None:
                        continue
                    problem = self._param_problem(key, value)
                    if problem is not None:
                        errs.add(f"{path}.{key}", problem, index, shown_id)
                        ok = False
                    else:
                        if overrides is None:
                            overrides = {}
                        overrides[key] = value
                elif key not in _ITEM_FIELDS:
                    if key == "model":
                        message = "model is set once for the whole job, not per item"
                    else:
                        message = unknown_message(key, ITEM_FIELDS, "an item")
                    errs.add(f"{path}.{clip_key(key)}", message, index, shown_id)
                    ok = False
            if overrides is not None and not COMBO_PARAMS.isdisjoint(raw):
                combo = combo_problem({**defaults, **overrides})
                if combo is not None:
                    name, message = combo
                    # Blame what this item set: the defaults were checked on their own.
                    blamed = name if name in raw else next(k for k in COMBO_PARAMS if k in raw)
                    errs.add(f"{path}.{blamed}", message, index, shown_id)
                    ok = False
            prompt = self._prompt(raw.get("prompt"), f"{path}.prompt", index, shown_id)
            refs = self._finish(index, prompt, raw.get("images"), raw.get("mask"), path, shown_id)
            # Items are kept until the first error: a job with one is refused whole.
            if ok and not errs and refs is not None and item_id is not None and prompt is not None:
                out.append(index, item_id, refs[0], prompt, overrides, refs[1], refs[2])

    def _item_id(self, raw: Any, path: str, index: int, seen: IdIndex, what: str) -> str | None:
        """The item's id, checked and registered; None when it is malformed."""
        if raw is None:
            first = seen.first_implicit(index)
            if first != index:
                message = (
                    f"this item has no id, so its id is its index '{index}', which "
                    f"{what}[{first}] already uses; give every item an id"
                )
                self.errors.add(f"{path}.id", message, index, str(index))
                return None
            return str(index)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            raw = str(raw)
        if not isinstance(raw, str):
            self.errors.add(f"{path}.id", f"id must be a string, not {json_type(raw)}", index, None)
            return None
        if not _ID_RE.match(raw):
            self.errors.add(
                f"{path}.id",
                f"id {show(raw)} must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'",
                index,
                clip(raw, 128),
            )
            return None
        item_id = raw
        first = seen.first(item_id, index)
        if first != index:
            message = f"id '{item_id}' is already used by {what}[{first}]; ids must be unique"
            self.errors.add(f"{path}.id", message, index, item_id)
            return None
        return item_id

    def _prompt(self, raw: Any, path: str, index: int, item_id: str | None) -> str | None:
        if raw is None:
            self.errors.add(path, "prompt is required", index, item_id)
            return None
        if not isinstance(raw, str):
            self.errors.add(path, f"prompt must be a string, not {json_type(raw)}", index, item_id)
            return None
        if len(raw) > MAX_PROMPT_CHARS:
            self.errors.add(
                path,
                f"prompt is {len(raw):,} characters; the most is {MAX_PROMPT_CHARS:,}",
                index,
                item_id,
            )
            return None
        if not raw or raw.isspace():
            self.errors.add(path, "prompt is empty", index, item_id)
            return None
        return raw

    def _finish(
        self,
        index: int,
        prompt: str | None,
        images: Any,
        mask: Any,
        path: str,
        shown_id: str | None,
    ) -> tuple[str, list[str] | None, str | None] | None:
        """Check the edit references: the item's endpoint, images and mask (None when anything
        was wrong, the prompt included)."""
        endpoint = GENERATIONS
        refs: list[str] | None = None
        mask_ref: str | None = None
        ok = True
        if images is not None:
            endpoint = EDITS
            refs = self._images(images, f"{path}.images", index, shown_id)
            ok = refs is not None
        if mask is not None:
            if images is None:
                self.errors.add(f"{path}.mask", "a mask needs images to apply to", index, shown_id)
                ok = False
            else:
                mask_ref = self._ref(mask, f"{path}.mask", index, shown_id)
                ok = ok and mask_ref is not None
        model = self.model
        if model is not None and endpoint not in model.endpoints:
            kind = "edits (items with images)" if endpoint == EDITS else "generations"
            self.errors.add(
                f"{path}.images" if endpoint == EDITS else f"{path}.prompt",
                f"model '{model.id}' does not offer {kind}",
                index,
                shown_id,
            )
            ok = False
        if not ok or prompt is None or model is None:
            return None
        return endpoint, refs, mask_ref

    def _images(self, raw: Any, path: str, index: int, item_id: str | None) -> list[str] | None:
        refs, where, why = images_check(raw, self.scope)
        if refs is None:
            self.errors.add(path + where, why, index, item_id)
        return refs

    def _ref(self, raw: Any, path: str, index: int, item_id: str | None) -> str | None:
        why = ref_check(raw, self.scope)
        if why is not None:
            self.errors.add(path, why, index, item_id)
            return None
        return str(raw)

    # -- template and rows --------------------------------------------------------------------

    def _rows(
        self,
        out: ItemList,
        template: Any,
        rows: Any,
        defaults: dict[str, Any],
        csv_rows: CsvRows | None,
    ) -> None:
        errs = self.errors
        if template is None:
            errs.add("template", "template is required with rows (placeholders like {title})")
            parts = None
        elif not isinstance(template, str):
            errs.add("template", f"template must be a string, not {json_type(template)}")
            parts = None
        else:
            parts = compile_template(template, errs)
        if rows is None:
            errs.add("rows", "rows are required with a template")
            return
        if not self._count_ok("rows", rows, "objects"):
            return
        if parts is None:
            return
        id_key: str | None = "id"
        images_key: str | None = "images"
        mask_key: str | None = "mask"
        if csv_rows is not None:
            id_key, images_key, mask_key = csv_rows.id_key, csv_rows.images_key, csv_rows.mask_key
            self.row_lines = csv_rows.lines
            missing = [name for name in parts[1::2] if name not in csv_rows.columns]
            if missing:
                errs.add(
                    "template",
                    f"placeholder {{{clip(missing[0], 64)}}} is not a column of the CSV; "
                    f"its columns are: {clip(', '.join(csv_rows.columns), 400)}",
                )
                return
        seen = IdIndex(len(rows))
        # What each rendered prompt adds to the body: the template's own text (the values it
        # fills in are already in the body).
        literal = sum(len(part) for part in parts[0::2])
        for index, row in enumerate(_elements(rows)):
            path = f"rows[{index}]"
            where = self._line(index)
            if not isinstance(row, dict):
                errs.add(path, f"a row must be an object, not {json_type(row)}", index)
                continue
            if csv_rows is not None and index in csv_rows.ragged:
                continue  # already reported: wrong number of fields
            raw_id = row.get(id_key) if id_key else None
            if csv_rows is not None and id_key and raw_id == "":
                errs.add(
                    f"{path}.{id_key}",
                    f"the id column '{id_key}' is empty{where}",
                    index,
                    None,
                )
                continue
            item_id = self._item_id(raw_id, path, index, seen, "rows")
            shown_id = item_id if item_id is not None else shown_id_of(raw_id, index)
            prompt = render_template(parts, row, path, index, shown_id, where, errs)
            if prompt is not None:
                self._spend_prompt(literal)
                prompt = self._prompt(prompt, f"{path}.prompt", index, shown_id)
            images = row.get(images_key) if images_key else None
            mask = row.get(mask_key) if mask_key else None
            if csv_rows is not None:
                images = csv_refs(images, f"{path}.{images_key}", index, shown_id, errs)
                mask = mask or None
                if images is MISSING:
                    continue
            refs = self._finish(index, prompt, images, mask, path, shown_id)
            if not errs and refs is not None and item_id is not None and prompt is not None:
                out.append(index, item_id, refs[0], prompt, None, refs[1], refs[2])

    def _spend_prompt(self, chars: int) -> None:
        """Count what a rendered prompt adds against the body's budget; 413 once it is spent."""
        if self.prompt_bytes is None:
            return
        self.prompt_bytes -= chars
        if self.prompt_bytes < 0:
            raise too_large(
                "template",
                "the prompts the template renders, with the body, are over the body size "
                "limit (IMAGEBATCH_MAX_BODY_BYTES); split the job",
            )

    def _line(self, index: int) -> str:
        if self.row_lines is None:
            return ""
        return f" (CSV line {self.row_lines[index]})"


def _elements(seq: list[Any] | RawSeq | RowSeq) -> Iterator[Any]:
    """The items or rows one at a time, each let go of once read (the caller keeps no tree)."""
    if isinstance(seq, RawSeq | RowSeq):
        yield from seq.drain()
        return
    for index, value in enumerate(seq):
        seq[index] = None
        yield value
