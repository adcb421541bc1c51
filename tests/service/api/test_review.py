"""Review through the API: POST /v1/jobs/{id}/review, items filtered by decision, the review count
in the job view and each decision in the manifest; another tenant's job is out of reach.

A real API process with two tenants (tests/support/console.py); jobs are ended through the lanes'
own steps (tests/support/jobs.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import orjson
import pytest

from tests.support.console import Console, two_tenant_api
from tests.support.jobs import ended_job


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Console]:
    with two_tenant_api(tmp_path_factory.mktemp("review-api"), redis_url, db=6) as running:
        yield running


def client(api: Console, tenant: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {api.keys[tenant]}"}
    )


def test_decisions_show_in_the_view_the_items_and_the_manifest(api: Console) -> None:
    job = ended_job(api.ctx, 8, tenant="acme", fail={6})
    with client(api, "acme") as c:
        resp = c.post(
            f"/v1/jobs/{job.id}/review",
            json={
                "items": [
                    {"id": "sku-2", "decision": "rejected", "note": "wrong colour"},
                    {"id": "sku-5", "decision": "approved"},
                ]
            },
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["review"] == {"approved": 1, "rejected": 1, "unreviewed": 5}
        assert c.get(f"/v1/jobs/{job.id}").json()["review"]["rejected"] == 1
        rejected = c.get(f"/v1/jobs/{job.id}/items", params={"review": "rejected"}).json()
        assert [(i["id"], i["review"]["note"]) for i in rejected["data"]] == [
            ("sku-2", "wrong colour")
        ]
        lines = [
            orjson.loads(x) for x in c.get(f"/v1/jobs/{job.id}/manifest").content.split(b"\n") if x
        ]
        assert {x["id"]: (x["review"] or {}).get("decision") for x in lines} == {
            "sku-0": None,
            "sku-1": None,
            "sku-2": "rejected",
            "sku-3": None,
            "sku-4": None,
            "sku-5": "approved",
            "sku-6": None,
            "sku-7": None,
        }
        bad = c.get(f"/v1/jobs/{job.id}/items", params={"review": "maybe"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "review"


def test_a_review_that_names_a_failed_item_is_refused_with_its_index_and_id(api: Console) -> None:
    job = ended_job(api.ctx, 4, tenant="acme", fail={1})
    with client(api, "acme") as c:
        resp = c.post(
            f"/v1/jobs/{job.id}/review",
            json={
                "items": [
                    {"id": "sku-0", "decision": "approved"},
                    {"id": "sku-1", "decision": "rejected"},
                ]
            },
        )
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("application/problem+json")
    error = resp.json()["errors"][0]
    assert (error["field"], error["index"], error["id"]) == ("items[1].id", 1, "sku-1")
    assert api.ctx.store.review_counts(job.id) == {}


def test_another_tenants_job_cannot_be_reviewed(api: Console) -> None:
    job = ended_job(api.ctx, 2, tenant="rival")
    with client(api, "acme") as c:
        resp = c.post(
            f"/v1/jobs/{job.id}/review", json={"items": [{"id": "sku-0", "decision": "rejected"}]}
        )
    assert resp.status_code == 404
    assert api.ctx.store.review_counts(job.id) == {}
