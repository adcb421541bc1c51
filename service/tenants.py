"""Tenants, their API keys and their spend caps: who is calling, and how much they may spend.

This module owns the tenants file (``IMAGEBATCH_TENANTS_FILE``) and bearer-key authentication.
Keys are never stored in clear: the file holds the SHA-256 hex digest of each key, and a request's
key is hashed and compared against every digest with :func:`hmac.compare_digest`.

With no tenants file the API is open: every request, with or without a key, is tenant
``"default"`` with no spend caps. A tenants file that lists no tenant is refused rather than
silently opening the API.

The file is TOML (``.toml``) or YAML (``.yaml`` / ``.yml``), chosen by its extension::

    # tenants.toml
    [tenants.catalog-team]
    key_sha256 = [
        "3f2b9c0e6a1d4b7f8e5c2a9d0b1e4f7a6c3d8e2b5a0f9c4e7d1b6a3f8c2e5d0b",
    ]
    daily_usd = 50.0       # optional: cap on spend per UTC day
    monthly_usd = 1000.0   # optional: cap on spend per UTC calendar month
    reference_prefixes = ["s3://catalog/team-a/", "https://cdn.example.com/team-a/"]
    webhook_secret = "whsec_…"   # optional: signs this tenant's webhooks; none = no webhooks
    file_ids = false       # optional: may items reference upstream files (file-…) directly?

    [tenants.marketing]
    key_sha256 = ["9a0c…", "b71e…"]   # several keys, e.g. while rotating one

The same in YAML::

    tenants:
      catalog-team:
        key_sha256: ["3f2b9c0e…"]
        daily_usd: 50
        monthly_usd: 1000

``reference_prefixes`` says where the tenant's reference images may come from (whole path
segments: ``s3://catalog/team-a`` covers ``s3://catalog/team-a/x.png``, not ``team-ab/``); without
it a tenant may use only ``data:`` URLs and the images of its own jobs. ``webhook_secret`` is a
Standard Webhooks secret (``whsec_`` and base64); a tenant without one cannot ask for webhooks.

A tenant id is 1-64 characters of ``[A-Za-z0-9._-]``. ``key_sha256`` is required (an empty list
disables a tenant's access while keeping it known); each entry is 64 hex characters, and one digest
may belong to only one tenant. Make a key and its digest with::

    python -m service.tenants new-key        # prints the key (give it to the caller) and its digest
    python -m service.tenants digest ib_…    # the digest of an existing key
    python -m service.tenants new-webhook-secret   # a whsec_… secret for webhook_secret

Failure semantics: :func:`load_tenants` raises :class:`TenantsFileError` naming the file, the
tenant and the field for anything malformed (unknown fields included, so a typo such as
``dayly_usd`` never silently removes a cap). :meth:`Tenants.authenticate` raises
:class:`AuthError` with a message meant for the caller (the API answers 401 with it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.jobs.params import RefPrefix, parse_ref_prefix

DEFAULT_TENANT_ID = "default"
KEY_PREFIX = "ib_"

_TENANT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {
    "key_sha256",
    "daily_usd",
    "monthly_usd",
    "reference_prefixes",
    "webhook_secret",
    "file_ids",
}
WEBHOOK_SECRET_PREFIX = "whsec_"
# Standard Webhooks secrets are 24-64 random bytes; fewer than 16 is too weak to sign with.
_SECRET_BYTES = (16, 128)


class AuthError(Exception):
    """The request carries no usable credentials; ``message`` is safe to show the caller."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TenantsFileError(ValueError):
    """The tenants file is missing or malformed; the message names the tenant and the field."""


@dataclass(frozen=True)
class Tenant:
    id: str
    key_digests: frozenset[str]
    daily_usd: float | None = None
    monthly_usd: float | None = None
    reference_prefixes: tuple[RefPrefix, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    file_ids: bool = False


DEFAULT_TENANT = Tenant(id=DEFAULT_TENANT_ID, key_digests=frozenset())


def digest_key(key: str) -> str:
    """The SHA-256 hex digest of an API key, as the tenants file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: ``ib_`` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret: ``whsec_`` and the base64 of 32 random bytes."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def webhook_secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot sign webhooks, or None (``whsec_`` + base64 of 16-128 bytes)."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return (
            "must start with whsec_ (make one with `python -m service.tenants new-webhook-secret`)"
        )
    try:
        raw = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return "must be whsec_ followed by base64"
    low, high = _SECRET_BYTES
    if not low <= len(raw) <= high:
        return f"must hold {low} to {high} random bytes, not {len(raw)}"
    return None


class Tenants:
    """The configured tenants; :attr:`open` when none are, and every caller is ``default``."""

    def __init__(self, tenants: Iterable[Tenant] = ()):
        self._by_id: dict[str, Tenant] = {}
        self._digests: list[tuple[bytes, Tenant]] = []
        for tenant in tenants:
            if tenant.id in self._by_id:
                raise ValueError(f"tenant {tenant.id!r} is listed twice")
            self._by_id[tenant.id] = tenant
            self._digests.extend((d.encode("ascii"), tenant) for d in sorted(tenant.key_digests))
        self.open = not self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self._by_id.values())

    def get(self, tenant_id: str) -> Tenant | None:
        """The tenant with this id (workers look budgets up by the id stored on a job)."""
        if self.open and tenant_id == DEFAULT_TENANT_ID:
            return DEFAULT_TENANT
        return self._by_id.get(tenant_id)

    def authenticate(self, authorization_header: str | None) -> Tenant:
        """The tenant owning the bearer key in an ``Authorization`` header value."""
        if self.open:
            return DEFAULT_TENANT
        if authorization_header is None or not authorization_header.strip():
            raise AuthError("Missing API key: send the header `Authorization: Bearer <key>`.")
        scheme, _, key = authorization_header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(
                "Malformed Authorization header: expected `Authorization: Bearer <key>`."
            )
        presented = digest_key(key).encode("ascii")
        found: Tenant | None = None
        # Compare against every digest, without stopping at a match, so the time taken does not
        # say which digest (or how much of one) matched.
        for digest, tenant in self._digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise AuthError("Unknown API key.")
        return found


def load_tenants(path: Path | None) -> Tenants:
    """Read the tenants file; ``None`` gives the open API (tenant ``default``, no caps)."""
    if path is None:
        return Tenants()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise TenantsFileError(
            f"tenants file {path}: unknown format {suffix or '(no extension)'!r}; "
            "use a .toml, .yaml or .yml file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TenantsFileError(f"tenants file {path} does not exist") from None
    except OSError as exc:
        raise TenantsFileError(f"tenants file {path} cannot be read: {exc}") from None
    try:
        raw: Any = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise TenantsFileError(
            f"tenants file {path} is not valid {suffix[1:].upper()}: {exc}"
        ) from None
    return Tenants(_parse(raw, str(path)))


def _parse(raw: Any, where: str) -> list[Tenant]:
    if not isinstance(raw, Mapping) or "tenants" not in raw:
        raise TenantsFileError(f"tenants file {where}: expected a top-level `tenants` table")
    extra = set(raw) - {"tenants"}
    if extra:
        raise TenantsFileError(f"tenants file {where}: unknown top-level field(s) {sorted(extra)}")
    table = raw["tenants"]
    if not isinstance(table, Mapping):
        raise TenantsFileError(
            f"tenants file {where}: `tenants` must be a table of tenant id -> settings"
        )
    if not table:
        raise TenantsFileError(
            f"tenants file {where} lists no tenants; unset IMAGEBATCH_TENANTS_FILE to run an open API"
        )
    tenants: list[Tenant] = []
    owner: dict[str, str] = {}
    for tenant_id, spec in table.items():
        tenant = _tenant(str(tenant_id), spec, where)
        for digest in tenant.key_digests:
            if digest in owner:
                raise TenantsFileError(
                    f"tenants file {where}: tenant {tenant.id!r}: field `key_sha256`: a digest is "
                    f"also listed for tenant {owner[digest]!r}; a key belongs to one tenant"
                )
            owner[digest] = tenant.id
        tenants.append(tenant)
    return tenants


def _tenant(tenant_id: str, spec: Any, where: str) -> Tenant:
    prefix = f"tenants file {where}: tenant {tenant_id!r}"
    if not _TENANT_ID_RE.match(tenant_id):
        raise TenantsFileError(f"{prefix}: the id must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if not isinstance(spec, Mapping):
        raise TenantsFileError(f"{prefix}: expected a table with `key_sha256` (and optional caps)")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise TenantsFileError(
            f"{prefix}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}"
        )
    if "key_sha256" not in spec:
        raise TenantsFileError(f"{prefix}: field `key_sha256` is required (a list of key digests)")
    keys = spec["key_sha256"]
    if isinstance(keys, str) or not isinstance(keys, list):
        raise TenantsFileError(f"{prefix}: field `key_sha256` must be a list of hex digests")
    digests: set[str] = set()
    for i, value in enumerate(keys):
        if not isinstance(value, str):
            raise TenantsFileError(f"{prefix}: field `key_sha256[{i}]` must be a string")
        if value.startswith(KEY_PREFIX):
            raise TenantsFileError(
                f"{prefix}: field `key_sha256[{i}]` looks like a key in clear; store its digest "
                "instead (`python -m service.tenants digest <key>`)"
            )
        digest = value.strip().lower()
        if not _DIGEST_RE.match(digest):
            raise TenantsFileError(
                f"{prefix}: field `key_sha256[{i}]` must be a SHA-256 hex digest (64 hex characters)"
            )
        digests.add(digest)
    return Tenant(
        id=tenant_id,
        key_digests=frozenset(digests),
        daily_usd=_usd(spec.get("daily_usd"), f"{prefix}: field `daily_usd`"),
        monthly_usd=_usd(spec.get("monthly_usd"), f"{prefix}: field `monthly_usd`"),
        reference_prefixes=_prefixes(spec.get("reference_prefixes"), prefix),
        webhook_secret=_secret(spec.get("webhook_secret"), prefix),
        file_ids=_flag(spec.get("file_ids", False), f"{prefix}: field `file_ids`"),
    )


def _prefixes(value: Any, where: str) -> tuple[RefPrefix, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list):
        raise TenantsFileError(f"{where}: field `reference_prefixes` must be a list of strings")
    out = []
    for i, text in enumerate(value):
        try:
            out.append(parse_ref_prefix(text))
        except ValueError as exc:
            raise TenantsFileError(f"{where}: field `reference_prefixes[{i}]`: {exc}") from None
    return tuple(out)


def _secret(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TenantsFileError(f"{where}: field `webhook_secret` must be a string")
    problem = webhook_secret_problem(value.strip())
    if problem:
        raise TenantsFileError(f"{where}: field `webhook_secret` {problem}")
    return value.strip()


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TenantsFileError(f"{what} must be true or false")
    return value


def _usd(value: Any, what: str) -> float | None:
    if value is None:
        return None
    # bool is an int in Python; `daily_usd = true` is a mistake, not a cap of $1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TenantsFileError(f"{what} must be a number of US dollars")
    if not math.isfinite(value) or value < 0:
        raise TenantsFileError(f"{what} must be a finite number >= 0")
    return float(value)


def main(argv: list[str] | None = None) -> int:
    """``new-key`` prints a fresh key and its digest; ``digest KEY`` prints a key's digest;
    ``new-webhook-secret`` prints a secret for ``webhook_secret``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["new-key"]:
        key = new_key()
        print(f"key:        {key}")
        print(f"key_sha256: {digest_key(key)}")
        return 0
    if args == ["new-webhook-secret"]:
        print(new_webhook_secret())
        return 0
    if len(args) == 2 and args[0] == "digest":
        print(digest_key(args[1]))
        return 0
    print(
        "usage: python -m service.tenants new-key | digest KEY | new-webhook-secret",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
