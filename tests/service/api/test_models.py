"""GET /v1/models and intake's model checks as a caller meets them: a real API process reading a
real simulator's model list at start. No workers run here.

The simulator announces gpt-image-2-2026-04-21 shut down on 2020-01-01 (the catalog gives it no
date) and lists no gpt-image-2.5-flare (its catalog lacks it); nothing depends on today's date
beyond the shipped catalog's 2026-12-01 shutdowns being past.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import orjson
import pytest
import redis

from tests.support.catalog import catalog_variant
from tests.support.procs import free_port, start_server
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import job_body

SNAPSHOT = "gpt-image-2-2026-04-21"
FAR_PAST = "2020-01-01"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorHandle]:
    tmp = tmp_path_factory.mktemp("sim")
    handle = start_simulator(
        tmp / "data",
        catalog_file=catalog_variant(tmp, "upstream.toml", drop=("gpt-image-2.5-flare",)),
        shutdown=f"{SNAPSHOT}={FAR_PAST}",
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, sim: SimulatorHandle
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("api")
    port = free_port()
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/4",
        "IMAGEBATCH_STORAGE_URL": (tmp / "storage").as_uri(),
        "IMAGEBATCH_DATA_DIR": str(tmp / "data"),
        "OPENAI_BASE_URL": sim.url,
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


def post_job(api: str, body: dict[str, Any]) -> httpx2.Response:
    return httpx2.post(
        f"{api}/v1/jobs",
        content=orjson.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def test_models_lists_the_26_models_with_state_batch_support_and_prices(api: str) -> None:
    resp = httpx2.get(f"{api}/v1/models", timeout=30)
    assert resp.status_code == 200, resp.text
    listing = resp.json()
    assert listing["lifecycle_source"] == "upstream" and listing["upstream_list_read_at"]
    models = {m["id"]: m for m in listing["data"]}
    for new in ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare"):
        m = models[new]
        assert m["state"] == "active" and m["shutdown_date"] is None and m["offered_upstream"]
        assert m["batch"] == {"supported": False, "configured": False, "learned": None}
        assert m["token_counts"] == "unpublished"
        assert m["prices"]["sync"]["image_output"] == 30.0
        assert m["prices"]["batch"]["image_output"] == 15.0
        assert "/v1/images/edits" in m["endpoints"] and "high" in m["qualities"]
    old = models["gpt-image-1.5"]
    assert old["state"] == "shut_down" and old["shutdown_date"] == "2026-12-01"
    assert old["replacements"][0] == "gpt-image-2.6-sunburst"
    snap = models[SNAPSHOT]
    assert snap["state"] == "shut_down" and snap["shutdown_date"] == FAR_PAST
    assert snap["shutdown_source"] == "upstream"
    assert models["gpt-image-2.5-flare"]["offered_upstream"] is False
    assert models["gpt-image-2"]["batch"]["supported"] is True
    one = httpx2.get(f"{api}/v1/models/gpt-image-2.6-flare", timeout=30)
    assert one.status_code == 200 and one.json()["id"] == "gpt-image-2.6-flare"
    missing = httpx2.get(f"{api}/v1/models/dall-e-9", timeout=30)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


def refused(api: str, model: str) -> str:
    body = job_body(2)
    body["model"] = model
    resp = post_job(api, body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["errors"][0]["field"] == "model"
    return str(problem["detail"])


def test_a_job_for_a_shut_down_model_names_a_26_replacement(api: str) -> None:
    detail = refused(api, "gpt-image-1.5")
    assert "2026-12-01" in detail and "'gpt-image-2.6-sunburst'" in detail


def test_a_shutdown_announced_only_upstream_is_refused(api: str) -> None:
    detail = refused(api, SNAPSHOT)
    assert FAR_PAST in detail and "announced by upstream" in detail
    assert "not offered by upstream" in refused(api, "gpt-image-2.5-flare")
    # The alias itself is fine.
    assert post_job(api, job_body(2)).status_code == 202


def test_the_shutdown_gauge_and_the_webhook_route_without_a_secret(api: str) -> None:
    text = httpx2.get(f"{api}/metrics", timeout=30).text
    line = f'imagebatch_model_shutdown_timestamp_seconds{{model="{SNAPSHOT}"}} 1.5778368e+09'
    assert line in text
    assert 'imagebatch_model_shutdown_timestamp_seconds{model="gpt-image-2.6-flare"}' not in text
    resp = httpx2.post(f"{api}/v1/webhooks/openai", content=b"{}", timeout=30)
    assert resp.status_code == 404 and "OPENAI_WEBHOOK_SECRET" in resp.json()["detail"]
