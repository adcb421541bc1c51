"""The simulator's settings: one field per flag, each also ``IMAGEBATCH_SIM_<FLAG>`` (env or .env).

:class:`SimulatorConfig` is built once per process (by :mod:`simulator.cli`, or directly in tests)
and passed to :func:`simulator.app.create_app`; nothing here reads the environment at import time.
The model catalog is the one the service reads (``IMAGEBATCH_CATALOG_FILE``), unless
``--catalog-file`` / ``IMAGEBATCH_SIM_CATALOG_FILE`` names another, so the simulator and the
service agree on which models exist and what they cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Upstream caps on one batch input file (facts §1.1, §2). Overridable for tests and operators
# who want to exercise the limits without building a 200 MB file.
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1000 * 1000


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
    batch_queue_tokens: int = Field(
        0, ge=0, description="Enqueued batch input tokens allowed per model; 0 = no limit."
    )
    fail_rate: float = Field(
        0.0, ge=0, le=1, description="Share of sync requests and batch lines answered with a 500."
    )
    latency_ms: float = Field(0.0, ge=0, description="Added latency of each sync image request.")
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
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v == "" else v

    def moderation_rules(self) -> dict[str, str]:
        """Blocked word (lower case) -> the category it is reported under."""
        rules: dict[str, str] = {}
        for part in self.moderation_words.split(","):
            word, _, category = part.partition("=")
            word = word.strip().lower()
            if word:
                rules[word] = category.strip() or "other"
        return rules
