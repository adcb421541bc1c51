"""The batch path end to end: API → Celery workers → simulator's Batch API → storage."""

from __future__ import annotations

import io
import signal
from collections import Counter
from pathlib import Path

import boto3
import httpx2
import pytest
from PIL import Image

from tests.support.procs import start_redis, wait_until
from tests.support.stack import job_body

pytestmark = pytest.mark.slow


def _images_on_disk(stack_tmp: Path, job_id: str) -> list[Path]:
    root = stack_tmp / "storage" / "jobs" / job_id / "images"
    return (
        sorted(p for p in root.glob("*") if not p.name.endswith(".meta.json"))
        if root.exists()
        else []
    )


def test_thousand_items_over_two_batches_all_decode(make_simulator, make_stack):
    sim = make_simulator()
    stack = make_stack(sim, env={"IMAGEBATCH_BATCH_MAX_LINES": "400"}).start()
    body = job_body(1000)
    # Mixed sizes and formats, set per item over the defaults.
    for i, item in enumerate(body["items"]):
        if i % 3 == 1:
            item["size"] = "1536x1024"
            item["output_format"] = "jpeg"
        elif i % 3 == 2:
            item["size"] = "1024x1536"
            item["output_format"] = "webp"
    accepted = stack.submit(body)
    assert accepted["items"] == 1000 and accepted["estimate"]["tokens"]["image_output"] > 0
    job = stack.wait_job(accepted["id"], timeout=180)
    assert job["status"] == "succeeded", stack.logs()
    assert job["counts"]["succeeded"] == 1000
    assert (
        len([b for b in job["upstream_batches"] if b["batch_id"]]) >= 3
    )  # 1000 lines / 400 per batch

    files = _images_on_disk(stack.tmp, accepted["id"])
    assert len(files) == 1000
    expected = {
        0: ((1024, 1024), "PNG", ".png"),
        1: ((1536, 1024), "JPEG", ".jpg"),
        2: ((1024, 1536), "WEBP", ".webp"),
    }
    for i in range(1000):
        size, fmt, ext = expected[i % 3]
        path = stack.tmp / "storage" / "jobs" / accepted["id"] / "images" / f"sku-{i}{ext}"
        with Image.open(path) as img:
            assert (img.size, img.format) == (size, fmt), path.name

    manifest = stack.manifest(accepted["id"])
    assert len(manifest) == 1000
    assert {m["id"] for m in manifest} == {f"sku-{i}" for i in range(1000)}
    assert all(m["status"] == "succeeded" and m["usage"]["image_output"] > 0 for m in manifest)
    first = next(m for m in manifest if m["id"] == "sku-0")
    with stack.client() as c:
        img = c.get(first["urls"][0])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (1024, 1024)


def test_moderation_blocked_items_leave_job_partially_failed(make_simulator, make_stack):
    sim = make_simulator(moderation_words="forbidden")
    stack = make_stack(sim).start()
    body = job_body(20)
    for i in (3, 7, 11):
        body["items"][i]["prompt"] = "A forbidden scene"
    job = stack.wait_job(stack.submit(body)["id"])
    assert job["status"] == "partially_failed"
    assert job["counts"]["succeeded"] == 17 and job["counts"]["failed"] == 3
    failed = {m["id"]: m for m in stack.manifest(job["id"]) if m["status"] == "failed"}
    assert set(failed) == {"sku-3", "sku-7", "sku-11"}
    for m in failed.values():
        assert m["error"]["code"] == "moderation_blocked"
        assert m["attempts"] == 1  # a moderation block is final: never retried
    with stack.client() as c:
        page = c.get(f"/v1/jobs/{job['id']}/items", params={"status": "failed"}).json()
    assert {i["id"] for i in page["data"]} == set(failed)


def test_expired_batch_resubmits_unfinished_items(make_simulator, make_stack):
    # 150 lines at 100/s in a 1-second window: the first batch expires part-way.
    sim = make_simulator(rate=100, completion_window=1)
    stack = make_stack(sim).start()
    job = stack.wait_job(stack.submit(job_body(150))["id"], timeout=120)
    assert job["status"] == "succeeded", stack.logs()
    statuses = [b["upstream_status"] for b in job["upstream_batches"]]
    assert statuses.count("expired") >= 1 and len(statuses) >= 2
    assert len(_images_on_disk(stack.tmp, job["id"])) == 150
    manifest = stack.manifest(job["id"])
    assert any(m["attempts"] >= 1 for m in manifest)


def test_cancel_mid_run_cancels_upstream_and_keeps_finished_images(make_simulator, make_stack):
    sim = make_simulator(rate=40)
    stack = make_stack(sim).start()
    job_id = stack.submit(job_body(400))["id"]
    wait_until(
        lambda: any(
            b["upstream_status"] == "in_progress" and b["completed"] > 20
            for b in stack.job(job_id)["upstream_batches"]
        ),
        timeout=60,
        message="the batch to be running",
    )
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = stack.wait_job(job_id, timeout=90)
    assert job["status"] == "cancelled"
    assert all(
        b["upstream_status"] == "cancelled" for b in job["upstream_batches"] if b["batch_id"]
    )
    done = job["counts"]["succeeded"]
    assert 0 < done < 400 and job["counts"]["cancelled"] == 400 - done
    assert len(_images_on_disk(stack.tmp, job_id)) == done


def test_worker_killed_mid_collect_stores_each_image_once_and_counts_once(
    make_simulator, make_stack
):
    sim = make_simulator(image_bytes=400_000)
    stack = make_stack(sim, env={"IMAGEBATCH_COLLECT_LEASE_SECONDS": "3"})
    stack.start_api()
    stack.start_worker("control", name="control")
    collector = stack.start_worker("collect", concurrency=1, name="collect")
    stack.start_beat()
    job_id = stack.submit(job_body(300))["id"]
    wait_until(
        lambda: len(_images_on_disk(stack.tmp, job_id)) >= 30,
        timeout=90,
        message="collect to be under way",
    )
    assert collector.alive()
    stack.kill("collect", signal.SIGKILL)
    assert stack.job(job_id)["status"] == "running"
    stack.start_worker("collect", concurrency=1, name="collect2")
    job = stack.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded", stack.logs()
    assert len(_images_on_disk(stack.tmp, job_id)) == 300
    billed = sim.stats()
    batch_ids = [b["batch_id"] for b in job["upstream_batches"] if b["batch_id"]]
    billed_tokens = Counter()
    for bid in batch_ids:
        billed_tokens.update(billed["batches"][bid]["tokens"])
    assert job["tokens"]["image_output"] == billed_tokens["image_output"]
    assert job["tokens"]["text_input"] == billed_tokens["text_input"]
    assert job["images_stored"] == 300


def test_restart_of_the_whole_stack_mid_job_loses_nothing(make_simulator, make_stack, tmp_path):
    redis_proc, url = start_redis(tmp_path / "own-redis")
    redis_proc.stop()
    # A Redis of this test's own, with its append-only file, killed and restarted with the rest.
    port = url.rsplit(":", 1)[1].split("/")[0]
    from tests.support.procs import redis_server_binary, start_server

    def redis_up():
        return start_server(
            [
                redis_server_binary(),
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(tmp_path / "own-redis"),
            ],
            int(port),
            tmp_path / "own-redis" / "redis.log",
        )

    rproc = redis_up()
    sim = make_simulator(rate=150)
    stack = make_stack(sim, redis_url=url).start()
    job_id = stack.submit(job_body(400), **{"Idempotency-Key": "restart-test"})["id"]
    wait_until(
        lambda: stack.job(job_id)["upstream_batches"], timeout=30, message="a batch to be submitted"
    )
    for name in list(stack.procs):
        stack.kill(name)
    rproc.kill()
    rproc.stop()
    rproc = redis_up()
    try:
        stack.start()
        job = stack.wait_job(job_id, timeout=120)
        assert job["status"] == "succeeded", stack.logs()
        assert len(_images_on_disk(stack.tmp, job_id)) == 400
        # The same Idempotency-Key still answers with the same job.
        assert stack.submit(job_body(400), **{"Idempotency-Key": "restart-test"})["id"] == job_id
    finally:
        stack.stop()
        rproc.stop()


def test_s3_storage_over_http(make_simulator, make_stack, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="e2e-images")
    sim = make_simulator()
    stack = make_stack(
        sim,
        storage_url="s3://e2e-images/prod",
        env={"IMAGEBATCH_S3_ENDPOINT_URL": s3_endpoint, "IMAGEBATCH_S3_PATH_STYLE": "true"},
    ).start()
    job = stack.wait_job(stack.submit(job_body(12, fmt="webp", size="1536x1024"))["id"])
    assert job["status"] == "succeeded", stack.logs()
    key = f"prod/jobs/{job['id']}/images/sku-5.webp"
    head = s3.head_object(Bucket="e2e-images", Key=key)
    assert head["ContentType"] == "image/webp"
    assert head["Metadata"]["item"] == "sku-5" and head["Metadata"]["job"] == job["id"]
    assert len(head["Metadata"]["sha256"]) == 64
    with stack.client() as c:
        items = c.get(f"/v1/jobs/{job['id']}/items").json()["data"]
    url = next(i for i in items if i["id"] == "sku-5")["urls"][0]
    img = Image.open(io.BytesIO(httpx2.get(url).content))
    assert img.size == (1536, 1024) and img.format == "WEBP"
    listed = s3.list_objects_v2(Bucket="e2e-images", Prefix=f"prod/jobs/{job['id']}/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[-1] for o in listed} >= {"request.jsonl", "manifest.jsonl"}


def test_webhook_is_called_when_the_job_finishes(make_simulator, make_stack):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from standardwebhooks import Webhook

    from service.tenants import new_webhook_secret

    secret = new_webhook_secret()
    received: list[dict] = []
    ids: list[str] = []
    calls = {"n": 0}

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            calls["n"] += 1
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            ids.append(self.headers["webhook-id"])
            body = Webhook(secret).verify(raw, dict(self.headers))  # raises unless signed by us
            if calls["n"] == 1:  # the receiver is briefly down: the webhook must be retried
                self.send_response(503)
            else:
                received.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sim = make_simulator()
        # The receiver is on loopback: allowed only because the operator says so.
        env = {
            "IMAGEBATCH_WEBHOOK_SECRET": secret,
            "IMAGEBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
        stack = make_stack(sim, env=env).start()
        url = f"http://127.0.0.1:{server.server_port}/hooks/imagebatch"
        job = stack.wait_job(stack.submit(job_body(5, webhook_url=url))["id"])
        assert job["status"] == "succeeded"
        wait_until(lambda: received, timeout=30, message="the webhook")
        assert received[0]["event"] == "job.finished"
        assert received[0]["job"]["id"] == job["id"] and received[0]["job"]["status"] == "succeeded"
        assert calls["n"] == 2
        assert ids[0] == ids[1]  # one event, one webhook-id, however many attempts
    finally:
        server.shutdown()


def test_edits_with_reference_images_and_bad_references_fail_alone(
    make_simulator, make_stack, s3_endpoint
):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="e2e-edits")
    s3.create_bucket(Bucket="catalog")
    photo = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 30, 30)).save(photo, format="PNG")
    s3.put_object(Bucket="catalog", Key="1002.png", Body=photo.getvalue(), ContentType="image/png")
    sim = make_simulator()
    stack = make_stack(
        sim,
        storage_url="s3://e2e-edits/prod",
        env={
            "IMAGEBATCH_S3_ENDPOINT_URL": s3_endpoint,
            "IMAGEBATCH_S3_PATH_STYLE": "true",
            "IMAGEBATCH_REFERENCE_PREFIXES": "s3://catalog/,s3://e2e-gone-bucket/",
        },
    ).start()
    body = job_body(5)
    for item in body["items"][:3]:
        item["images"] = ["s3://catalog/1002.png"]
    body["items"][3]["images"] = ["s3://catalog/missing.png"]
    body["items"][4]["images"] = ["s3://e2e-gone-bucket/1002.png"]  # no such bucket
    job = stack.wait_job(stack.submit(body)["id"])
    assert job["status"] == "partially_failed", stack.logs()
    assert job["counts"]["succeeded"] == 3 and job["counts"]["failed"] == 2
    assert job["tokens"]["image_input"] > 0  # the reference images were billed as image input
    manifest = {m["id"]: m for m in stack.manifest(job["id"])}
    # Unreadable references fail their own item at once, with the reason; they are not retried.
    for bad in ("sku-3", "sku-4"):
        assert manifest[bad]["error"]["code"] == "reference_unreadable"
    assert "missing.png" in manifest["sku-3"]["error"]["message"]
    assert "does not exist" in manifest["sku-4"]["error"]["message"]
    got = s3.get_object(Bucket="e2e-edits", Key=f"prod/jobs/{job['id']}/images/sku-0.png")[
        "Body"
    ].read()
    assert Image.open(io.BytesIO(got)).size == (1024, 1024)
