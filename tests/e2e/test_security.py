"""Two tenants on one stack, tried as a hostile tenant would: references into each other's images
and into buckets that are not theirs, webhooks to loopback, a receiver that trickles.

Real Redis, moto's S3 server for storage and reference buckets, real Celery workers, the
simulator over HTTP.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx2
import orjson
import pytest
from PIL import Image

from service.redis.leases import pause
from service.tenants import digest_key, new_webhook_secret
from tests.support.procs import wait_until
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "ib_e2e-tenant-a", "ib_e2e-tenant-b"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


def tenants_file(tmp: Path, secret_a: str | None = None) -> Path:
    path = tmp / "tenants.toml"
    secret = f'webhook_secret = "{secret_a}"\n' if secret_a else ""
    path.write_text(
        f"""
[tenants.a]
key_sha256 = ["{digest_key(KEY_A)}"]
reference_prefixes = ["s3://e2e-catalog-a/"]
{secret}
[tenants.b]
key_sha256 = ["{digest_key(KEY_B)}"]
reference_prefixes = ["s3://e2e-catalog-b/", "s3://e2e-no-such-bucket/"]
"""
    )
    return path


def post(stack: Stack, body: dict[str, Any], auth: dict[str, str]) -> httpx2.Response:
    with stack.client() as c:
        return c.post(
            "/v1/jobs",
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json", **auth},
        )


def as_tenant(stack: Stack, auth: dict[str, str]) -> Stack:
    stack.headers = dict(auth)
    return stack


def edit_job(ref: str) -> dict[str, Any]:
    body = job_body(1)
    body["items"][0]["images"] = [ref]
    return body


def test_a_tenant_reads_only_its_own_references(make_simulator, make_stack, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for bucket in ("e2e-sec", "e2e-catalog-a", "e2e-catalog-b"):
        s3.create_bucket(Bucket=bucket)
    photo = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 120, 200)).save(photo, format="PNG")
    s3.put_object(Bucket="e2e-catalog-a", Key="shoes/1.png", Body=photo.getvalue())
    stack = make_stack(
        make_simulator(),
        storage_url="s3://e2e-sec/prod",
        env={
            "IMAGEBATCH_S3_ENDPOINT_URL": s3_endpoint,
            "IMAGEBATCH_S3_PATH_STYLE": "true",
            "IMAGEBATCH_TENANTS_FILE": str(tenants_file(tmp_path)),
        },
    ).start()

    # A edits its own catalog's photo, then one of its own stored images.
    first = post(stack, edit_job("s3://e2e-catalog-a/shoes/1.png"), AUTH_A)
    assert first.status_code == 202, first.text
    a_job = as_tenant(stack, AUTH_A).wait_job(first.json()["id"])
    assert a_job["status"] == "succeeded", stack.logs()
    a_image = f"s3://e2e-sec/prod/jobs/{a_job['id']}/images/sku-0.png"
    again = post(stack, edit_job(a_image), AUTH_A)
    assert again.status_code == 202, again.text
    assert as_tenant(stack, AUTH_A).wait_job(again.json()["id"])["status"] == "succeeded"

    # B may not reach A's image, A's request, A's catalog, nor any other bucket.
    for ref, why in [
        (a_image, "own storage"),
        (f"s3://e2e-sec/prod/jobs/{a_job['id']}/request.jsonl", "own storage"),
        ("s3://e2e-catalog-a/shoes/1.png", "outside the prefixes"),
        ("s3://some-other-bucket/anything.png", "outside the prefixes"),
        ("s3://e2e-catalog-b/../e2e-catalog-a/shoes/1.png", "'..'"),
    ]:
        resp = post(stack, edit_job(ref), AUTH_B)
        assert resp.status_code == 422, (ref, resp.text)
        err = resp.json()["errors"][0]
        assert err["field"] == "items[0].images[0]" and err["index"] == 0 and err["id"] == "sku-0"
        assert why in err["message"], (ref, err["message"])

    # A bucket B may use but that does not exist fails the item at once, with the reason.
    started = time.monotonic()
    gone = post(stack, edit_job("s3://e2e-no-such-bucket/x.png"), AUTH_B)
    assert gone.status_code == 202, gone.text
    b_job = as_tenant(stack, AUTH_B).wait_job(gone.json()["id"], timeout=60)
    assert b_job["status"] == "failed" and time.monotonic() - started < 30
    [line] = stack.manifest(b_job["id"])
    assert line["error"]["code"] == "reference_unreadable"
    assert "does not exist" in line["error"]["message"]


@pytest.fixture
def trickler() -> Iterator[tuple[str, list[float]]]:
    """A webhook receiver on loopback that answers one byte every 2 s, for ever."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[float] = []
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                if pause(stop, 2.0):  # not stop.wait(2.0): it never returns under faketime
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/hook", accepted
    stop.set()
    thread.join()
    server.close()


def test_webhooks_are_refused_on_loopback_and_a_trickling_receiver_delays_nobody(
    make_simulator, make_stack, tmp_path, trickler
):
    url, accepted = trickler
    secret = new_webhook_secret()
    sim = make_simulator()

    # By default a loopback receiver is refused at intake, and never contacted.
    closed = make_stack(sim, env={"IMAGEBATCH_TENANTS_FILE": str(tenants_file(tmp_path, secret))})
    closed.start_api()
    refused = post(closed, job_body(1, webhook_url=url), AUTH_A)
    assert refused.status_code == 422 and "loopback" in refused.json()["detail"]
    assert accepted == []
    closed.stop()

    # The operator allows loopback; workers run as deployed: webhooks on a pool of their own.
    stack = make_stack(
        sim,
        env={
            "IMAGEBATCH_TENANTS_FILE": str(tenants_file(tmp_path, secret)),
            "IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            # Long enough that a job queued behind the attempt would plainly wait for it.
            "IMAGEBATCH_WEBHOOK_TIMEOUT_SECONDS": "15",
        },
    )
    stack.start_api()
    stack.start_worker("control,collect,sync", concurrency=1, name="jobs")
    stack.start_worker("webhooks", concurrency=1, name="hooks")
    stack.start_beat()

    def one_item_job_seconds() -> float:
        started = time.monotonic()
        resp = post(stack, job_body(1), AUTH_B)
        assert resp.status_code == 202, resp.text
        job = as_tenant(stack, AUTH_B).wait_job(resp.json()["id"], timeout=120)
        assert job["status"] == "succeeded"
        return time.monotonic() - started

    one_item_job_seconds()  # warm up: the workers' first task loads what they need
    alone = one_item_job_seconds()
    hooked = post(stack, job_body(1, webhook_url=url), AUTH_A)
    assert hooked.status_code == 202, hooked.text
    a_id = hooked.json()["id"]
    wait_until(lambda: accepted, timeout=60, message="the trickling receiver to be called")
    # Another tenant's job while A's webhook is being trickled.
    beside = one_item_job_seconds()
    assert beside < alone + 5, f"alone {alone:.1f}s, beside a trickling webhook {beside:.1f}s"

    def first_attempt() -> dict[str, Any] | None:
        with stack.client() as c:
            data = c.get(f"/v1/jobs/{a_id}/webhooks", headers=AUTH_A).json()["data"]
        return data[0] if data else None

    attempt = wait_until(first_attempt, timeout=60, message="the first attempt to be logged")
    assert attempt["outcome"] == "timeout" and attempt["next_attempt_at"]
    # The whole attempt was cut at its 15 s deadline, though every byte came within 2 s.
    assert 14_500 <= attempt["duration_ms"] <= 17_000, attempt
    print(
        f"\none-item job alone {alone:.1f}s, beside a trickling webhook {beside:.1f}s; "
        f"attempt cut after {attempt['duration_ms']} ms"
    )
