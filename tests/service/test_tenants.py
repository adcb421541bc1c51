"""Tenants file parsing and bearer-key authentication."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from service.tenants import (
    DEFAULT_TENANT_ID,
    AuthError,
    Tenants,
    TenantsFileError,
    digest_key,
    load_tenants,
    new_key,
)

KEY_A = "ib_alpha-key-for-tests"
KEY_B1 = "ib_bravo-first"
KEY_B2 = "ib_bravo-second"


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(
        f"""
[tenants.catalog-team]
key_sha256 = ["{digest_key(KEY_A)}"]
daily_usd = 50.0
monthly_usd = 1000

[tenants.marketing]
key_sha256 = ["{digest_key(KEY_B1)}", "{digest_key(KEY_B2).upper()}"]
"""
    )
    return path


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"""
tenants:
  catalog-team:
    key_sha256: ["{digest_key(KEY_A)}"]
    daily_usd: 50
    monthly_usd: 1000.0
  marketing:
    key_sha256:
      - {digest_key(KEY_B1)}
      - {digest_key(KEY_B2)}
"""
    )
    return path


def test_digest_is_sha256_hex_and_new_keys_are_unique() -> None:
    assert digest_key("ib_x") == hashlib.sha256(b"ib_x").hexdigest()
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("ib_") and len(k) >= 40 for k in keys)


@pytest.mark.parametrize("make", [_toml, _yaml], ids=["toml", "yaml"])
def test_file_loads_tenants_with_digests_and_caps(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    tenants = load_tenants(make(tmp_path))
    assert not tenants.open
    assert len(tenants) == 2
    catalog = tenants.get("catalog-team")
    assert catalog is not None
    assert catalog.key_digests == frozenset({digest_key(KEY_A)})
    assert (catalog.daily_usd, catalog.monthly_usd) == (50.0, 1000.0)
    marketing = tenants.get("marketing")
    assert marketing is not None
    # Upper-case hex in the file is accepted and normalised.
    assert marketing.key_digests == frozenset({digest_key(KEY_B1), digest_key(KEY_B2)})
    assert (marketing.daily_usd, marketing.monthly_usd) == (None, None)

    assert tenants.authenticate(f"Bearer {KEY_A}").id == "catalog-team"
    assert tenants.authenticate(f"bearer {KEY_B1}").id == "marketing"
    assert tenants.authenticate(f"Bearer  {KEY_B2} ").id == "marketing"
    assert tenants.get(DEFAULT_TENANT_ID) is None


def test_authenticate_refuses_missing_malformed_and_unknown_keys(tmp_path: Path) -> None:
    tenants = load_tenants(_toml(tmp_path))
    cases = {
        None: "Missing API key",
        "": "Missing API key",
        KEY_A: "Malformed Authorization header",
        f"Basic {KEY_A}": "Malformed Authorization header",
        "Bearer ": "Malformed Authorization header",
        "Bearer ib_not-a-key-we-know": "Unknown API key",
        # The digest itself is not a key: someone who read the file cannot log in with it.
        f"Bearer {digest_key(KEY_A)}": "Unknown API key",
    }
    for header, message in cases.items():
        with pytest.raises(AuthError) as err:
            tenants.authenticate(header)
        assert message in err.value.message, header


def test_no_file_is_an_open_api_as_default_tenant() -> None:
    tenants = load_tenants(None)
    assert tenants.open
    for header in (None, "Bearer anything", "garbage"):
        tenant = tenants.authenticate(header)
        assert tenant.id == DEFAULT_TENANT_ID
        assert (tenant.daily_usd, tenant.monthly_usd) == (None, None)
    assert tenants.get(DEFAULT_TENANT_ID) is not None
    assert Tenants().open


GOOD = digest_key(KEY_A)


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("t.toml", "[tenants.a\nkey_sha256 = []", "is not valid TOML"),
        ("t.yaml", "tenants: [unclosed", "is not valid YAML"),
        ("t.json", "{}", "unknown format '.json'"),
        ("t.toml", "x = 1", "top-level `tenants` table"),
        ("t.toml", "[tenants]", "lists no tenants"),
        ("t.toml", f'tenants = {{}}\nextra = "{GOOD}"', "unknown top-level field(s) ['extra']"),
        ("t.yaml", "tenants:\n  - a\n", "`tenants` must be a table"),
        (
            "t.toml",
            "[tenants.acme]\ndaily_usd = 5",
            "tenant 'acme': field `key_sha256` is required",
        ),
        (
            "t.toml",
            '[tenants.acme]\nkey_sha256 = "abc"',
            "tenant 'acme': field `key_sha256` must be a list",
        ),
        (
            "t.toml",
            '[tenants.acme]\nkey_sha256 = ["abc"]',
            "tenant 'acme': field `key_sha256[0]` must be a SHA-256",
        ),
        (
            "t.toml",
            "[tenants.acme]\nkey_sha256 = [1]",
            "tenant 'acme': field `key_sha256[0]` must be a string",
        ),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}", "{KEY_A}"]',
            "tenant 'acme': field `key_sha256[1]` looks like a key in clear",
        ),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}"]\ndayly_usd = 5',
            "tenant 'acme': unknown field(s) ['dayly_usd']",
        ),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}"]\ndaily_usd = "5"',
            "tenant 'acme': field `daily_usd` must be a number",
        ),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}"]\nmonthly_usd = -1',
            "tenant 'acme': field `monthly_usd` must be a finite number >= 0",
        ),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}"]\ndaily_usd = true',
            "tenant 'acme': field `daily_usd` must be a number",
        ),
        ("t.toml", f'[tenants."a b"]\nkey_sha256 = ["{GOOD}"]', "tenant 'a b': the id must be"),
        ("t.yaml", "tenants:\n  acme: 5\n", "tenant 'acme': expected a table"),
        (
            "t.toml",
            f'[tenants.acme]\nkey_sha256 = ["{GOOD}"]\n[tenants.beta]\nkey_sha256 = ["{GOOD}"]',
            "tenant 'beta': field `key_sha256`: a digest is also listed for tenant 'acme'",
        ),
    ],
)
def test_malformed_files_name_the_tenant_and_field(
    tmp_path: Path, name: str, body: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(TenantsFileError) as err:
        load_tenants(path)
    assert expected in str(err.value)
    assert name in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="does not exist"):
        load_tenants(tmp_path / "nope.toml")


def test_a_tenant_with_no_keys_is_known_but_cannot_log_in(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(f'[tenants.off]\nkey_sha256 = []\n[tenants.on]\nkey_sha256 = ["{GOOD}"]')
    tenants = load_tenants(path)
    assert tenants.get("off") is not None
    assert tenants.authenticate(f"Bearer {KEY_A}").id == "on"


def test_command_line_makes_a_key_and_its_digest() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.tenants", "new-key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    key, digest = lines["key"].strip(), lines["key_sha256"].strip()
    assert key.startswith("ib_")
    assert digest == digest_key(key)
    again = subprocess.run(
        [sys.executable, "-m", "service.tenants", "digest", key],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert again.strip() == digest
