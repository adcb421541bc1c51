"""/v1/schedules and /v1/jobs/{id}/retry as a caller meets them: a real uvicorn process with two
tenants on a real Redis, local storage, no workers (nothing here runs a job)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import redis

from tests.support.procs import free_port, start_server
from tests.support.stack import job_body

KEYS = {"catalog": "ib-test-key-catalog", "marketing": "ib-test-key-marketing"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("api")
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        "".join(
            f'[tenants.{name}]\nkey_sha256 = ["{hashlib.sha256(key.encode()).hexdigest()}"]\n'
            for name, key in KEYS.items()
        )
    )
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/4",
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "IMAGEBATCH_TENANTS_FILE": str(tenants),
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


def client(api: str, tenant: str = "catalog") -> httpx2.Client:
    return httpx2.Client(
        base_url=api, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30
    )


def schedule_body(**extra: Any) -> dict[str, Any]:
    return {
        "name": "nightly",
        "cron": "0 3 * * *",
        "timezone": "Europe/Riga",
        "job": job_body(2),
        **extra,
    }


def test_create_read_patch_delete_and_tenants_apart(api: str) -> None:
    with client(api) as c, client(api, "marketing") as other:
        made = c.post("/v1/schedules", json=schedule_body(labels={"team": "catalog"}))
        assert made.status_code == 201, made.text
        s = made.json()
        assert made.headers["location"] == f"/v1/schedules/{s['id']}"
        assert s["next_run_at"].endswith("Z") and s["description"] == "At 03:00 every day"
        assert s["last_run"] == {
            "slot": None,
            "at": None,
            "job_id": None,
            "status": None,
            "error": None,
        }
        assert other.get(f"/v1/schedules/{s['id']}").status_code == 404
        assert other.patch(f"/v1/schedules/{s['id']}", json={"enabled": False}).status_code == 404
        assert other.delete(f"/v1/schedules/{s['id']}").status_code == 404
        assert other.get("/v1/schedules").json()["data"] == []
        paused = c.patch(f"/v1/schedules/{s['id']}", json={"enabled": False}).json()
        assert paused["enabled"] is False and paused["next_run_at"] is None
        assert [x["id"] for x in c.get("/v1/schedules").json()["data"]] == [s["id"]]
        assert c.delete(f"/v1/schedules/{s['id']}").status_code == 204
        assert c.get(f"/v1/schedules/{s['id']}").status_code == 404


def test_run_now_makes_a_job_labelled_with_the_schedule(api: str) -> None:
    with client(api) as c:
        s = c.post("/v1/schedules", json=schedule_body()).json()
        run = c.post(f"/v1/schedules/{s['id']}/run")
        assert run.status_code == 202, run.text
        job = run.json()
        assert job["labels"]["schedule"] == s["id"] and job["status"] == "queued"
        runs = c.get("/v1/jobs", params={"schedule": s["id"]}).json()["data"]
        assert [r["id"] for r in runs] == [job["id"]]
        view = c.get(f"/v1/schedules/{s['id']}").json()
        assert view["last_run"]["job_id"] == job["id"] and view["last_run"]["status"] == "queued"
        # Not finished: a retry is a conflict.
        retry = c.post(f"/v1/jobs/{job['id']}/retry", json={})
        assert retry.status_code == 409 and "finished" in retry.json()["detail"]
    with client(api, "marketing") as other:
        assert other.post(f"/v1/schedules/{s['id']}/run").status_code == 404
        assert other.post(f"/v1/jobs/{job['id']}/retry", json={}).status_code == 404


def test_bad_schedules_and_retry_bodies_are_problems_naming_the_field(api: str) -> None:
    with client(api) as c:
        bad_job = job_body(2)
        bad_job["items"][0]["quality"] = "ultra"
        resp = c.post("/v1/schedules", json=schedule_body(job=bad_job, cron="0 3 * *"))
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")
        fields = {e["field"] for e in resp.json()["errors"]}
        assert fields == {"cron"}  # the template is checked once the schedule itself is sound
        resp = c.post("/v1/schedules", json=schedule_body(job=bad_job))
        (error,) = resp.json()["errors"]
        assert error["field"] == "job.items[0].quality" and error["id"] == "sku-0"
        job = c.post("/v1/jobs", json=job_body(1)).json()
        resp = c.post(f"/v1/jobs/{job['id']}/retry", json={"statuses": ["lost"]})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "statuses[0]"
