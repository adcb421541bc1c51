"""The simulator's settings: one field per flag, each also ``IMAGEBATCH_SIM_<FLAG>`` (env or .env).

:class:`SimulatorConfig` is built once per process (by :mod:`simulator.cli`, or directly in tests)
and passed to :func:`simulator.app.create_app`; nothing here reads the environment at import time.
The model catalog is the one the service reads (``IMAGEBATCH_CATALOG_FILE``), unless
``--catalog-file`` / ``IMAGEBATCH_SIM_CATALOG_FILE`` names another, so the simulator and the
service agree on which models exist and what they cost. ``--shutdown`` and
``--batch-unsupported`` then play upstream news on top of it (a shutdown date announced, batch
support withdrawn); ``--webhook-url`` with ``--webhook-secret`` makes it send OpenAI's batch events.

List-valued settings are comma-separated in the environment (``IMAGEBATCH_SIM_SHUTDOWN=
a=2026-01-01,b=2027-01-01``); a value that does not parse is a validation error naming the field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Upstream caps on one batch input file (facts §1.1, §2). Overridable for tests and operators
# who want to exercise the limits without building a 200 MB file.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1000 * 1000


class ConfigError(ValueError):
    """Settings that are each valid but do not fit the catalog (a flag naming an unknown model)."""


class SimulatorConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMAGEBATCH_SIM_", env_file=".env", extra="ignore", populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8100, description="Port to listen on.")
    data_dir: Path = Field(
        Path(".imagebatch/simulator"),
        description="Where files, batches and their outputs are kept (survives restarts).",
    )
    catalog_file: Path | None = Field(
        None,
        validation_alias=AliasChoices(
            "catalog_file", "IMAGEBATCH_SIM_CATALOG_FILE", "IMAGEBATCH_CATALOG_FILE"
        ),
        description="Model catalog (TOML); unset = the one the service ships.",
    )
    rate: float = Field(20.0, gt=0, description="Images per second each batch processes.")
    validate_seconds: float = Field(1.0, ge=0, description="Seconds a batch spends validating.")
    finalize_seconds: float = Field(1.0, ge=0, description="Seconds a batch spends finalizing.")
    completion_window: float = Field(
        86_400.0, gt=0, description="Seconds after creation at which an unfinished batch expires."
    )
    rpm: int = Field(0, ge=0, description="Sync image requests per minute; 0 = no limit.")
    ipm: int = Field(0, ge=0, description="Sync images per minute; 0 = no limit.")
    tpm: int = Field(0, ge=0, description="Sync tokens (input + output) per minute; 0 = no limit.")
    limit_window: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Seconds of the per-minute limits each bucket holds when full (and refills "
        "over); the rate stays per minute. Shorter than 60 makes a test's bucket drain sooner.",
    )
    batch_queue_tokens: int = Field(
        0, ge=0, description="Enqueued batch input tokens allowed per model; 0 = no limit."
    )
    fail_rate: float = Field(
        0.0, ge=0, le=1, description="Share of sync requests and batch lines answered with a 500."
    )
    latency_ms: float = Field(0.0, ge=0, description="Added latency of each sync image request.")
    download_bytes_per_second: int = Field(
        0,
        ge=0,
        description="Pace of file downloads (output files are read this slowly); 0 = full speed.",
    )
    create_delay: float = Field(
        0.0,
        ge=0,
        description="Seconds a batch create waits before the batch exists and is answered (a slow "
        "create; the batch is created even if the client gave up waiting).",
    )
    moderation_words: str = Field(
        "",
        description="Comma list of words that get a prompt blocked; 'word=category' names the category.",
    )
    image_bytes: int = Field(
        0, ge=0, description="Pad each image to about this many bytes; 0 = natural."
    )
    plain_images: bool = Field(
        False, description="Leave the prompt out of the picture (the default draws it)."
    )
    api_key: SecretStr | None = Field(None, description="When set, requests must carry this key.")
    max_batch_lines: int = Field(
        BATCH_MAX_LINES, gt=0, description="Lines one batch input may hold."
    )
    max_batch_bytes: int = Field(
        BATCH_MAX_BYTES, gt=0, description="Bytes one batch input may hold."
    )
    batch_unsupported: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        description="Models whose batches fail validation as upstream's do for a model without "
        "Batch API support (comma list); adds to the catalog's `batch = false`.",
    )
    shutdown: Annotated[dict[str, dt.date], NoDecode] = Field(
        default_factory=dict,
        description="MODEL=YYYY-MM-DD (comma list): the shutdown_date /v1/models announces for "
        "MODEL, which is refused from that day on; replaces the catalog's date.",
    )
    webhook_url: str | None = Field(
        None, description="Where to POST OpenAI's signed batch.* events; unset = none sent."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="The whsec_... secret the events are signed with (Standard Webhooks)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    ssl_certfile: Path | None = Field(
        None, description="Serve HTTPS with this PEM certificate (chain); unset = plain HTTP."
    )
    ssl_keyfile: Path | None = Field(None, description="The private key of ssl_certfile (PEM).")

    @field_validator(
        "api_key", "webhook_url", "webhook_secret", "ssl_certfile", "ssl_keyfile", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("batch_unsupported", mode="before")
    @classmethod
    def _model_list(cls, v: object) -> object:
        if isinstance(v, str | list | tuple):
            return frozenset(_comma_parts(v))
        return v

    @field_validator("shutdown", mode="before")
    @classmethod
    def _shutdown_dates(cls, v: object) -> object:
        if not isinstance(v, str | list | tuple):
            return v
        dates: dict[str, dt.date] = {}
        for part in _comma_parts(v):
            model, sep, day = part.partition("=")
            try:
                if not sep or not model.strip():
                    raise ValueError
                dates[model.strip()] = dt.date.fromisoformat(day.strip())
            except ValueError:
                raise ValueError(f"'{part}' is not MODEL=YYYY-MM-DD") from None
        return dates

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"'{v}' is not an http(s) URL")
        return v

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            raw = v.get_secret_value()
            try:
                ok = raw.startswith("whsec_") and bool(base64.b64decode(raw[6:], validate=True))
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                raise ValueError("expected 'whsec_' followed by base64 (as OpenAI issues them)")
        return v

    @model_validator(mode="after")
    def _webhook_pair(self) -> SimulatorConfig:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            # OpenAI never sends an unsigned event, so neither does the simulator.
            raise ValueError("--webhook-url and --webhook-secret are set together or not at all")
        return self

    def moderation_rules(self) -> dict[str, str]:
        """Blocked word (lower case) -> the category it is reported under."""
        rules: dict[str, str] = {}
        for part in self.moderation_words.split(","):
            word, _, category = part.partition("=")
            word = word.strip().lower()
            if word:
                rules[word] = category.strip() or "other"
        return rules


def _comma_parts(value: str | list[object] | tuple[object, ...]) -> list[str]:
    """``"a, b"`` or ``["a", "b,c"]`` (a repeated flag) as ``["a", "b", "c"]``."""
    items = [value] if isinstance(value, str) else [str(x) for x in value]
    return [p.strip() for item in items for p in item.split(",") if p.strip()]
