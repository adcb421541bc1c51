"""The API as a hostile caller meets it: real uvicorn processes (an open API and one with two
tenants) on a real Redis, local storage, no workers.

Every refusal must be problem+json naming what was wrong, and nothing of one tenant may reach
another.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
import redis

from service.api.app import create_app
from service.settings import Settings
from service.tenants import digest_key, new_webhook_secret
from tests.support.procs import free_port, start_server
from tests.support.stack import job_body

KEY_A, KEY_B, METRICS_TOKEN = "ib_tenant-a-key", "ib_tenant-b-key", "metrics-token-123"


def start_api(tmp: Path, redis_url: str, db: int, **env: str) -> tuple[Any, str]:
    port = free_port()
    full = {
        "IMAGEBATCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + f"/{db}",
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "IMAGEBATCH_MAX_BODY_BYTES": "2000000",
        "IMAGEBATCH_MAX_ITEMS_PER_JOB": "500",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-test",
        **env,
    }
    redis.Redis.from_url(full["IMAGEBATCH_REDIS_URL"]).flushdb()
    cmd = [sys.executable, "-m", "service.cli", "api", "--port", str(port)]
    proc = start_server(cmd, port, tmp / "api.log", env=full)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("open-api")
    proc, url = start_api(tmp, redis_url, 4, IMAGEBATCH_WEBHOOK_SECRET=new_webhook_secret())
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def tenants_api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tenants-api")
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        f"""
[tenants.a]
key_sha256 = ["{digest_key(KEY_A)}"]
reference_prefixes = ["s3://catalog-a/", "https://cdn.example.com/a/"]
daily_usd = 50.0

[tenants.b]
key_sha256 = ["{digest_key(KEY_B)}"]
file_ids = true
"""
    )
    proc, url = start_api(
        tmp,
        redis_url,
        5,
        IMAGEBATCH_TENANTS_FILE=str(tenants),
        IMAGEBATCH_METRICS_TOKEN=METRICS_TOKEN,
    )
    STORAGE_ROOTS[url] = (tmp / "storage").resolve()
    yield url
    proc.stop()


# Where each API process keeps its local storage (the test made it; tenants are not told).
STORAGE_ROOTS: dict[str, Path] = {}


def problem(resp: httpx2.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    assert resp.headers.get("x-request-id", "").startswith("req_")
    return resp.json()  # type: ignore[no-any-return]


def submit(api: str, body: Any, key: str | None = None, **headers: str) -> httpx2.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx2.post(
        f"{api}/v1/jobs",
        content=content,
        headers={"Content-Type": "application/json", **auth, **headers},
        timeout=30,
    )


def fields(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body["errors"]]


# --- errors are problems ---------------------------------------------------------------------


def test_405_names_the_allowed_methods(open_api: str) -> None:
    resp = httpx2.delete(f"{open_api}/v1/jobs")
    assert fields(problem(resp, 405)) == ["method"]
    assert resp.headers["allow"] == "POST"
    problem(httpx2.get(f"{open_api}/nowhere"), 404)


@pytest.mark.parametrize(
    "job_id", ["job_zzz", "job_%20x", "..%2F..%2Fetc", "j" * 300, "job_0123456789abcdef0123456789"]
)
def test_malformed_or_unknown_job_ids_are_404_problems(open_api: str, job_id: str) -> None:
    for path in ("", "/items", "/manifest", "/webhooks"):
        problem(httpx2.get(f"{open_api}/v1/jobs/{job_id}{path}"), 404)
    problem(httpx2.post(f"{open_api}/v1/jobs/{job_id}/cancel"), 404)


@pytest.mark.parametrize("cursor", ["nan", "inf", "-1", "1e400", "abc", "1" * 40, "\u0661"])
def test_malformed_cursors_are_400_problems(open_api: str, cursor: str) -> None:
    body = problem(httpx2.get(f"{open_api}/v1/jobs", params={"cursor": cursor}), 400)
    assert fields(body) == ["cursor"]
    job = submit(open_api, job_body(1)).json()
    problem(httpx2.get(f"{open_api}/v1/jobs/{job['id']}/items", params={"cursor": cursor}), 400)


def test_the_catch_all_answers_a_500_problem_with_the_logged_request_id(caplog) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    app = create_app(Settings(allowed_hosts=["*"]))  # the real middleware and handler stack
    app.add_api_route("/boom", boom)

    async def call() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/boom")

    resp = anyio.run(call)
    body = problem(resp, 500)
    assert body["request_id"] == resp.headers["x-request-id"]
    assert "secret internals" not in resp.text
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log


def test_healthz_answers_while_every_worker_thread_is_taken() -> None:
    """Liveness is the event loop: a probe never queues behind jobs being validated."""
    app = create_app(Settings(allowed_hosts=["*"]))

    async def call() -> httpx2.Response:
        limiter = anyio.to_thread.current_default_thread_limiter()
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
            # What a burst of large jobs does: every thread of the pool the handlers run in busy.
            taken = [object() for _ in range(int(limiter.total_tokens))]
            for holder in taken:
                await limiter.acquire_on_behalf_of(holder)
            try:
                with anyio.fail_after(5):
                    return await client.get("/healthz")
            finally:
                for holder in taken:
                    limiter.release_on_behalf_of(holder)

    resp = anyio.run(call)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


# --- media types, hosts, origins (an open API) -----------------------------------------------


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_missing_or_foreign_content_type_is_415(open_api: str, ctype: str | None) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    resp = httpx2.post(f"{open_api}/v1/jobs", content=orjson.dumps(job_body(1)), headers=headers)
    assert fields(problem(resp, 415)) == ["Content-Type"]


def test_an_open_api_answers_only_to_its_own_host_names(open_api: str) -> None:
    evil = {"Host": "attacker.example"}
    body = problem(httpx2.get(f"{open_api}/v1/jobs", headers=evil), 400)
    assert "IMAGEBATCH_ALLOWED_HOSTS" in body["detail"] and fields(body) == ["Host"]
    assert httpx2.get(f"{open_api}/healthz", headers=evil).status_code == 200  # probes use IPs
    assert httpx2.get(f"{open_api}/v1/jobs", headers={"Host": "localhost:1"}).status_code == 200


def test_a_web_page_of_another_origin_cannot_submit(open_api: str) -> None:
    resp = submit(open_api, job_body(1), Origin="https://attacker.example")
    assert fields(problem(resp, 403)) == ["Origin"]
    assert submit(open_api, job_body(1), Origin="http://127.0.0.1:8000").status_code == 202


# --- hostile bodies ----------------------------------------------------------------------------


def test_duplicate_keys_are_422_naming_the_key(open_api: str) -> None:
    raw = b'{"items":[{"id":"a","prompt":"x","quality":"low","quality":"high"}]}'
    body = problem(submit(open_api, raw), 422)
    assert body["errors"][0]["field"] == "items[0].quality" and body["errors"][0]["index"] == 0


@pytest.mark.parametrize("size", ["1024x1024\n", " 1024x1024", "\u0661\u0660\u0662\u0664x1024"])
def test_sizes_take_ascii_digits_and_nothing_else(open_api: str, size: str) -> None:
    body = job_body(1)
    body["defaults"]["size"] = size
    assert fields(problem(submit(open_api, body), 422)) == ["defaults.size"]


def test_the_same_idempotency_key_with_another_body_is_refused(open_api: str) -> None:
    first = submit(open_api, job_body(2), **{"Idempotency-Key": "nightly-1"})
    assert first.status_code == 202
    again = submit(open_api, job_body(2), **{"Idempotency-Key": "nightly-1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = submit(open_api, job_body(3), **{"Idempotency-Key": "nightly-1"})
    body = problem(other, 422)
    assert fields(body) == ["Idempotency-Key"] and first.json()["id"] in body["detail"]


def test_a_dense_body_is_refused_before_it_is_parsed(open_api: str) -> None:
    raw = b'{"items":[' + b"{}," * 600_000 + b"{}]}"  # 1.8 MB, under the body limit
    body = problem(submit(open_api, raw), 422)
    assert fields(body) == ["items"] and "500" in body["detail"]


def test_rendered_prompts_count_against_the_body_limit(open_api: str) -> None:
    template = "x" * 30_000 + " {title}"
    csv = "title\n" + "mug\n" * 100  # 400 bytes of CSV, 3 MB of prompts
    resp = httpx2.post(
        f"{open_api}/v1/jobs",
        params={"template": template},
        content=csv.encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert fields(problem(resp, 413)) == ["template"]


# --- webhooks at intake ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://2130706433/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
    ],
)
def test_webhooks_to_internal_addresses_are_refused_at_intake(open_api: str, url: str) -> None:
    body = problem(submit(open_api, job_body(1, webhook_url=url)), 422)
    assert fields(body) == ["webhook_url"]


def test_a_tenant_without_a_webhook_secret_cannot_ask_for_webhooks(tenants_api: str) -> None:
    body = problem(
        submit(tenants_api, job_body(1, webhook_url="https://example.com/h"), KEY_A), 422
    )
    assert fields(body) == ["webhook_url"] and "secret" in body["detail"]


# --- tenants: references, operations endpoints -------------------------------------------------


def test_references_stay_inside_the_tenants_scope(tenants_api: str) -> None:
    mine = submit(tenants_api, job_body(1), KEY_A).json()["id"]
    theirs = submit(tenants_api, job_body(1), KEY_B).json()["id"]
    root = STORAGE_ROOTS[tenants_api]
    cases = {
        f"{(root / 'jobs' / mine / 'images' / 'sku-0.png').as_uri()}": None,  # own image
        f"{(root / 'jobs' / theirs / 'images' / 'sku-0.png').as_uri()}": "own storage",
        f"{(root / 'jobs' / mine / 'request.jsonl').as_uri()}": "own storage",
        "s3://catalog-a/shoes/1.png": None,
        "s3://catalog-ab/shoes/1.png": "outside the prefixes",
        "s3://catalog-a/../catalog-b/1.png": "'..'",
        "https://cdn.example.com/a/1.png": None,
        "https://cdn.example.com/b/1.png": "outside the prefixes",
        "https://cdn.example.com.attacker.example/a/1.png": "outside the prefixes",
        "file-abc123": "not enabled",
    }
    for ref, refusal in cases.items():
        body = job_body(1)
        body["items"][0]["images"] = [ref]
        resp = submit(tenants_api, body, KEY_A)
        if refusal is None:
            assert resp.status_code == 202, (ref, resp.text)
        else:
            err = problem(resp, 422)["errors"][0]
            assert err["field"] == "items[0].images[0]" and err["id"] == "sku-0", ref
            assert refusal in err["message"], (ref, err["message"])
    body = job_body(1)
    body["items"][0]["images"] = ["file-abc123"]
    assert submit(tenants_api, body, KEY_B).status_code == 202  # b may use upstream file ids


def test_metrics_needs_the_token_when_tenants_are_configured(tenants_api: str) -> None:
    url = f"{tenants_api}/metrics"
    problem(httpx2.get(url), 401)
    problem(httpx2.get(url, headers={"Authorization": f"Bearer {KEY_A}"}), 401)
    ok = httpx2.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200 and "imagebatch_" in ok.text


def test_info_needs_a_key_and_shows_a_tenant_only_itself(tenants_api: str) -> None:
    assert fields(problem(httpx2.get(f"{tenants_api}/v1/info"), 401)) == ["Authorization"]
    info = httpx2.get(f"{tenants_api}/v1/info", headers={"Authorization": f"Bearer {KEY_A}"})
    data = info.json()
    assert data["tenant"]["id"] == "a" and data["tenant"]["daily_usd"] == 50.0
    assert data["tenant"]["reference_prefixes"] == ["s3://catalog-a/", "https://cdn.example.com/a/"]
    assert "storage" not in data and "base_url" not in data["upstream"]
    assert " b" not in info.text and '"b"' not in info.text
    ready = httpx2.get(f"{tenants_api}/readyz").json()
    assert ready == {"status": "ready", "checks": {"redis": "ok", "storage": "ok"}}


def test_another_tenants_job_is_indistinguishable_from_none(tenants_api: str) -> None:
    theirs = submit(tenants_api, job_body(1), KEY_B).json()["id"]
    auth = {"Authorization": f"Bearer {KEY_A}"}
    a = problem(httpx2.get(f"{tenants_api}/v1/jobs/{theirs}", headers=auth), 404)
    b = problem(httpx2.get(f"{tenants_api}/v1/jobs/job_{'0' * 23}", headers=auth), 404)
    assert a["title"] == b["title"] and a["type"] == b["type"]
