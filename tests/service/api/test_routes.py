"""The HTTP API as a caller meets it: a real uvicorn process on a real Redis, local storage.

No workers run here: these tests cover intake, validation, listing and the service endpoints.
The batch path itself is covered end to end in tests/e2e.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
import redis

from tests.support.procs import free_port, start_server
from tests.support.stack import job_body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    import sys

    tmp = tmp_path_factory.mktemp("api")
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3",
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "IMAGEBATCH_MAX_BODY_BYTES": "2000000",
        "IMAGEBATCH_MAX_ITEMS_PER_JOB": "500",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-test",
    }
    redis.Redis.from_url(env["IMAGEBATCH_REDIS_URL"]).flushdb()
    proc = start_server(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
        port,
        tmp / "api.log",
        env=env,
    )
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def post(api: str, body: Any, **headers: str) -> httpx2.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx2.post(
        f"{api}/v1/jobs",
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )


def problem(resp: httpx2.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return resp.json()  # type: ignore[no-any-return]


def test_accepts_a_job_and_stores_the_request_first(api: str, tmp_path: Path) -> None:
    resp = post(api, job_body(3))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["items"] == 3 and job["counts"]["pending"] == 3
    assert job["estimate"]["tokens"]["image_output"] == 3 * 196  # gpt-image-2 1024x1024 low
    assert job["estimate"]["usd"]["batch"] == pytest.approx(job["estimate"]["usd"]["sync"] / 2)
    got = httpx2.get(f"{api}/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["model"] == "gpt-image-2"


@pytest.mark.parametrize(
    ("mutate", "field", "index", "item_id"),
    [
        (lambda b: b.update(model="gpt-image-1"), "model", None, None),
        (lambda b: b.update(model="dall-e-9"), "model", None, None),
        (lambda b: b["items"][1].update(size="999x999"), "items[1].size", 1, "sku-1"),
        (lambda b: b["items"][2].update(quality="ultra"), "items[2].quality", 2, "sku-2"),
        (lambda b: b["items"][0].update(n=11), "items[0].n", 0, "sku-0"),
        (
            lambda b: b["items"][1].update(background="transparent", output_format="jpeg"),
            "items[1]",
            1,
            "sku-1",
        ),
        (lambda b: b["items"][2].update(prompt=""), "items[2].prompt", 2, "sku-2"),
        (lambda b: b["items"][2].update(prompt="x" * 32_001), "items[2].prompt", 2, "sku-2"),
        (lambda b: b["items"][2].update(id="sku-0"), "items[2].id", 2, "sku-0"),
        (lambda b: b["items"][1].update(id="bad id!"), "items[1].id", 1, "bad id!"),
    ],
)
def test_rejections_name_the_field_index_and_id(
    api: str, mutate: Any, field: str, index: int | None, item_id: str | None
) -> None:
    body = job_body(3)
    mutate(body)
    p = problem(post(api, body), 422)
    first = p["errors"][0]
    assert first["field"].startswith(field), p
    assert first.get("index") == index and first.get("id") == item_id, p
    assert field.split(".")[0].split("[")[0] in p["detail"], p


def test_shut_down_model_names_its_replacement(api: str) -> None:
    body = job_body(1)
    body["model"] = "gpt-image-1"
    p = problem(post(api, body), 422)
    assert "shut down" in p["detail"] and "gpt-image-2" in p["detail"]


def test_template_placeholder_without_column(api: str) -> None:
    body = {
        "model": "gpt-image-2",
        "template": "A {color} {title}",
        "rows": [{"color": "red", "title": "mug"}, {"color": "blue"}],
    }
    p = problem(post(api, body), 422)
    assert "title" in p["detail"] and p["errors"][0]["index"] == 1


def test_malformed_json_empty_job_too_many_items_and_too_large(api: str) -> None:
    assert problem(post(api, b'{"items": [}'), 400)["status"] == 400
    assert "items" in problem(post(api, {"model": "gpt-image-2", "items": []}), 422)["detail"]
    p = problem(post(api, job_body(501)), 422)
    assert "500" in p["detail"]
    p = problem(post(api, b'{"items": [' + b'"x",' * 700_000 + b'"x"]}'), 413)
    assert "2,000,000" in p["detail"]


def test_no_input_makes_it_answer_500(api: str) -> None:
    bodies: list[bytes] = [
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"{}",
        b'{"items": null}',
        b'{"items": [null]}',
        b'{"items": [{"prompt": 5}]}',
        b'{"items": [{"prompt": "a", "n": 1e308}]}',
        b'{"defaults": [], "items": [{"prompt": "a"}]}',
        b"\xff\xfe",
        b'{"rows": {}, "template": 3}',
        b'{"items": [{"prompt": "a", "images": [{}]}]}',
        b"[" * 10_000,
    ]
    for body in bodies:
        resp = post(api, body)
        assert 400 <= resp.status_code < 500, (body[:40], resp.status_code, resp.text[:300])
        assert resp.headers["content-type"].startswith("application/problem+json")


def test_idempotency_key_returns_the_same_job(api: str) -> None:
    a = post(api, job_body(2), **{"Idempotency-Key": "abc-123"})
    b = post(api, job_body(2), **{"Idempotency-Key": "abc-123"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert b.headers.get("idempotent-replayed") == "true"


def test_list_newest_first_with_cursor_and_label_filter(api: str) -> None:
    ids = [
        post(api, job_body(1, labels={"campaign": "list-test", "n": str(i)})).json()["id"]
        for i in range(5)
    ]
    page = httpx2.get(f"{api}/v1/jobs", params={"label": "campaign=list-test", "limit": 3}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:3]
    rest = httpx2.get(
        f"{api}/v1/jobs",
        params={"label": "campaign=list-test", "limit": 3, "cursor": page["next_cursor"]},
    ).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][3:]


def test_unknown_job_is_a_problem_404(api: str) -> None:
    p = problem(httpx2.get(f"{api}/v1/jobs/job_nope"), 404)
    assert "job_nope" in p["detail"]


def test_service_endpoints(api: str) -> None:
    assert httpx2.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx2.get(f"{api}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    info = httpx2.get(f"{api}/v1/info").json()
    assert info["default_model"] == "gpt-image-2" and "gpt-image-1" not in info["models"]
    assert httpx2.get(f"{api}/docs").status_code == 200
    assert "/v1/jobs" in httpx2.get(f"{api}/openapi.json").json()["paths"]
    metrics = httpx2.get(f"{api}/metrics").text
    assert "imagebatch_jobs{" in metrics and "imagebatch_queue_depth{" in metrics


def test_estimate_creates_nothing(api: str) -> None:
    before = httpx2.get(f"{api}/v1/jobs", params={"limit": 200}).json()["data"]
    resp = httpx2.post(
        f"{api}/v1/jobs/estimate",
        content=orjson.dumps(job_body(4, quality="high")),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 200
    est = resp.json()
    assert est["tokens"]["image_output"] == 4 * 7024
    assert est["usd"]["sync"] == pytest.approx(est["usd"]["batch"] * 2)
    after = httpx2.get(f"{api}/v1/jobs", params={"limit": 200}).json()["data"]
    assert len(after) == len(before)


def test_csv_catalog(api: str) -> None:
    csv = 'sku,color,title\nA-1,red,mug\nA-2,"blue, glossy",vase\n'
    resp = httpx2.post(
        f"{api}/v1/jobs",
        content=csv.encode(),
        params={"template": "Studio photo of a {color} {title}", "quality": "low"},
        headers={"Content-Type": "text/csv"},
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["items"] == 2
