"""What the simulator billed, for checking the service's accounting: ``GET /_simulator/stats``.

The JSON shape (every count is an integer)::

    {
      "since": 1795000000,                  # unix time of the process start or the last reset
      "batches": {
        "batch_…": {
          "model": "gpt-image-2", "status": "completed", "endpoint": "/v1/images/generations",
          "tokens": {"text_input": 0, "image_input": 0, "image_output": 0},
          "images": 0,                       # images made for successful lines
          "lines_completed": 0,              # lines in the output file (status 200)
          "lines_failed": 0,                 # lines in the error file (4xx/5xx, cancelled, expired)
          "server_errors_injected": 0,       # of lines_failed, the injected 500s
          "enqueued_tokens": 0               # input tokens this batch holds in the queue
        }
      },
      "models": {
        "gpt-image-2": {
          "tokens": {...}, "images": 0,      # billed: sync 200s plus successful batch lines
          "requests": 0,                     # sync requests answered plus batch lines executed
          "rate_limited": 0,                 # 429s sent (sync)
          "server_errors_injected": 0,       # injected 500s (sync and batch lines)
          "enqueued_tokens": 0,              # input tokens of batches validated and not finished
          "peak_enqueued_tokens": 0          # the most enqueued_tokens has been since `since`
        }
      },
      "sync": {"tokens": {...}, "images": 0, "requests": 0, "rate_limited": 0, "server_errors_injected": 0},
      "batch": {"tokens": {...}, "images": 0, "lines_completed": 0, "lines_failed": 0, "server_errors_injected": 0},
      "webhooks": {                          # added by simulator.app from simulator.webhooks
        "enabled": true, "url": "http://…",  # false / null without --webhook-url
        "events": 0,                         # batch.* events queued (one per finished batch)
        "by_type": {"batch.completed": 0, "batch.failed": 0, "batch.expired": 0, "batch.cancelled": 0},
        "attempts": 0,                       # POSTs made (first tries and retries)
        "delivered": 0,                      # events a receiver took with a 2xx
        "failed_attempts": 0,                # non-2xx, connection errors and timeouts
        "abandoned": 0,                      # events given up after 72 h of failures
        "pending": 0                         # events waiting for their next attempt, or in one
      }
    }

``tokens`` are exactly the ``usage`` the simulator returned: a batch's ``tokens`` equal the sum of
``usage`` over its output file, so the service's per-batch accounting can be compared with them.

Ownership and failure semantics: a batch's own counts live in its record (checkpointed with its
output files by :mod:`simulator.batches`), so after a hard restart they agree with the files. The
sync counts and peaks are kept here and saved to ``stats.json`` every few seconds and at shutdown;
a hard kill can lose the last few seconds of sync counts. ``POST /_simulator/reset`` forgets all
of it: sync counts go to zero, peaks restart from the current queue, and each batch's counts are
measured from their value at the reset (batches untouched since are left out).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Tally:
    """Counters of one batch, or of one model's sync traffic."""

    text_input: int = 0
    image_input: int = 0
    image_output: int = 0
    images: int = 0
    requests: int = 0
    completed: int = 0
    failed: int = 0
    rate_limited: int = 0
    server_errors_injected: int = 0

    def bill(self, text: int, image: int, output: int, images: int) -> None:
        self.text_input += text
        self.image_input += image
        self.image_output += output
        self.images += images

    def minus(self, other: Tally) -> Tally:
        return Tally(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def is_zero(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def tokens(self) -> dict[str, int]:
        return {
            "text_input": self.text_input,
            "image_input": self.image_input,
            "image_output": self.image_output,
        }

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Tally:
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in (raw or {}).items() if k in known})


class BatchView(Protocol):
    """What stats needs to know of a batch (implemented by ``simulator.batches.BatchRecord``)."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def tally(self) -> Tally: ...
    def enqueued_tokens(self) -> int: ...


def _model_entry() -> dict[str, Any]:
    return {
        "tokens": {"text_input": 0, "image_input": 0, "image_output": 0},
        "images": 0,
        "requests": 0,
        "rate_limited": 0,
        "server_errors_injected": 0,
        "enqueued_tokens": 0,
        "peak_enqueued_tokens": 0,
    }


class Stats:
    """Sync counters, enqueued-token peaks and the reset baselines of batch counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.since = int(time.time())
        self.sync: dict[str, Tally] = {}
        self.peaks: dict[str, int] = {}
        self.baselines: dict[str, Tally] = {}
        self._dirty = False

    # --- recording ------------------------------------------------------------------------------

    def sync_tally(self, model: str) -> Tally:
        self._dirty = True
        return self.sync.setdefault(model, Tally())

    def note_enqueued(self, model: str, total: int) -> None:
        if total > self.peaks.get(model, 0):
            self.peaks[model] = total
            self._dirty = True

    def reset(self, batches: Iterable[BatchView], enqueued: dict[str, int]) -> None:
        self.since = int(time.time())
        self.sync = {}
        self.peaks = {m: t for m, t in enqueued.items() if t}
        self.baselines = {b.id: Tally(**asdict(b.tally)) for b in batches}
        self._dirty = True

    # --- reading --------------------------------------------------------------------------------

    def snapshot(self, batches: Iterable[BatchView], enqueued: dict[str, int]) -> dict[str, Any]:
        out_batches: dict[str, Any] = {}
        models: dict[str, dict[str, Any]] = {}
        batch_total = Tally()
        for b in batches:
            base = self.baselines.get(b.id)
            delta = b.tally.minus(base) if base else b.tally
            if base is not None and delta.is_zero():
                continue
            out_batches[b.id] = {
                "model": b.model,
                "status": b.status,
                "endpoint": b.endpoint,
                "tokens": delta.tokens(),
                "images": delta.images,
                "lines_completed": delta.completed,
                "lines_failed": delta.failed,
                "server_errors_injected": delta.server_errors_injected,
                "enqueued_tokens": b.enqueued_tokens(),
            }
            batch_total.add(delta)
            if b.model:
                _add_to_model(models.setdefault(b.model, _model_entry()), delta)
        sync_total = Tally()
        for model, tally in self.sync.items():
            sync_total.add(tally)
            entry = models.setdefault(model, _model_entry())
            _add_to_model(entry, tally)
            entry["rate_limited"] += tally.rate_limited
        for model, total in enqueued.items():
            if total or model in models:
                models.setdefault(model, _model_entry())["enqueued_tokens"] = total
        for model, peak in self.peaks.items():
            models.setdefault(model, _model_entry())["peak_enqueued_tokens"] = peak
        return {
            "since": self.since,
            "batches": out_batches,
            "models": models,
            "sync": {
                "tokens": sync_total.tokens(),
                "images": sync_total.images,
                "requests": sync_total.requests,
                "rate_limited": sync_total.rate_limited,
                "server_errors_injected": sync_total.server_errors_injected,
            },
            "batch": {
                "tokens": batch_total.tokens(),
                "images": batch_total.images,
                "lines_completed": batch_total.completed,
                "lines_failed": batch_total.failed,
                "server_errors_injected": batch_total.server_errors_injected,
            },
        }

    # --- persistence ----------------------------------------------------------------------------

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            # A torn or foreign file: start counting afresh rather than refuse to start.
            return
        self.since = int(raw.get("since", self.since))
        self.sync = {m: Tally.from_json(t) for m, t in raw.get("sync", {}).items()}
        self.peaks = {m: int(p) for m, p in raw.get("peaks", {}).items()}
        self.baselines = {b: Tally.from_json(t) for b, t in raw.get("baselines", {}).items()}

    def save(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        data = {
            "since": self.since,
            "sync": {m: t.to_json() for m, t in self.sync.items()},
            "peaks": self.peaks,
            "baselines": {b: t.to_json() for b, t in self.baselines.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def _add_to_model(entry: dict[str, Any], tally: Tally) -> None:
    for kind, value in tally.tokens().items():
        entry["tokens"][kind] += value
    entry["images"] += tally.images
    entry["requests"] += tally.requests
    entry["server_errors_injected"] += tally.server_errors_injected
