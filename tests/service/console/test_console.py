"""The console over HTTP, as a browser without scripts meets it: sign-in with a key, sessions and
CSRF, every page of a tenant's own jobs, nothing of another tenant's, thumbnails made once and
served with the session, review and redo through forms.

A real API process (two tenants) on a real Redis and local storage; jobs are ended through the
lanes' own steps (tests/support/jobs.py). The browser itself is in tests/e2e/test_console_browser.py.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import time

import httpx2
from PIL import Image

from service.console.sessions import COOKIE
from service.jobs import pages, thumbs
from service.redis import keys
from service.storage import thumb_key
from tests.support.console import Console, csrf_of
from tests.support.jobs import ended_job, submit

PAGES = ("/ui/", "/ui/new", "/ui/spend")


def test_without_a_session_every_page_sends_the_browser_to_sign_in(console: Console) -> None:
    with console.client() as c:
        for path in (*PAGES, "/ui/jobs/job_0123456789abcdef01234567"):
            resp = c.get(path)
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/ui/sign-in?next=")


def test_sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session(console: Console) -> None:
    with console.client() as c:
        form = c.get("/ui/sign-in?next=/ui/spend")
        assert form.status_code == 200 and 'type="password"' in form.text
        assert "script-src 'self'" in form.headers["content-security-policy"]
        anonymous = c.cookies[COOKIE]
        bad = c.post("/ui/sign-in", data={"key": "ib_wrong", "csrf": csrf_of(form.text)})
        assert bad.status_code == 401 and "not accepted" in bad.text
        resp = c.post(
            "/ui/sign-in",
            data={"key": console.keys["acme"], "csrf": csrf_of(form.text), "next": "/ui/spend"},
        )
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/spend"
        cookie = resp.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/ui" in cookie
        assert "Secure" not in cookie  # plain http here; behind https it is set
        assert c.cookies[COOKIE] != anonymous  # a new session id after sign-in
        page = c.get("/ui/")
        assert page.status_code == 200 and "acme" in page.text
        signed = c.cookies[COOKIE]
        out = c.post("/ui/sign-out", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303
        c.cookies.set(COOKIE, signed, path="/ui")
        assert c.get("/ui/").status_code == 303  # the old cookie is worth nothing now


def test_a_form_post_without_the_csrf_token_is_refused(console: Console) -> None:
    job = ended_job(console.ctx, 3, tenant="acme")
    with console.signed_in("acme") as c:
        for path, data in (
            (f"/ui/jobs/{job.id}/review", {"item": f"0:{'sku-0'}", "decision": "rejected"}),
            ("/ui/sign-out", {}),
            ("/ui/new", {"kind": "json", "json_text": "{}", "action": "submit"}),
        ):
            refused = c.post(path, data=data)
            assert refused.status_code == 403, path
            assert "did not come from a page of this console" in refused.text
            wrong = c.post(path, data={**data, "csrf": "x" * 43})
            assert wrong.status_code == 403, path
    assert console.ctx.store.review_counts(job.id) == {}


def test_another_tenants_job_is_not_found_by_any_of_its_urls(console: Console) -> None:
    theirs = ended_job(console.ctx, 2, tenant="rival")
    with console.signed_in("acme") as c:
        for path in (
            f"/ui/jobs/{theirs.id}",
            f"/ui/jobs/{theirs.id}/gallery",
            f"/ui/jobs/{theirs.id}/live",
            f"/ui/jobs/{theirs.id}/items/0",
            f"/ui/jobs/{theirs.id}/thumbs/sku-0.png",
            f"/ui/jobs/{theirs.id}/images/sku-0.png",
            f"/ui/jobs/{theirs.id}/manifest.jsonl",
            f"/ui/jobs/{theirs.id}:items",  # not an id: never looked up as a key
        ):
            assert c.get(path).status_code == 404, path
        token = csrf_of(c.get("/ui/").text)
        resp = c.post(
            f"/ui/jobs/{theirs.id}/review",
            data={"csrf": token, "item": "0:sku-0", "decision": "rejected"},
        )
        assert resp.status_code == 404
        assert theirs.id not in c.get("/ui/").text
    assert console.ctx.store.review_counts(theirs.id) == {}


def test_every_page_of_a_job_renders(console: Console) -> None:
    job = ended_job(console.ctx, 60, tenant="acme", fail={7}, labels={"campaign": "spring"})
    with console.signed_in("acme") as c:
        listing = c.get("/ui/?label=campaign%3Dspring")
        assert listing.status_code == 200 and job.id in listing.text
        page = c.get(f"/ui/jobs/{job.id}")
        assert page.status_code == 200 and "59 of 60" not in page.text
        assert "60 of 60 items ended" in page.text and "Download manifest" in page.text
        live = c.get(f"/ui/jobs/{job.id}/live")
        assert live.status_code == 200 and "<html" not in live.text
        first = c.get(f"/ui/jobs/{job.id}/gallery")
        assert first.status_code == 200
        thumbs_on_first = re.findall(r'src="(/ui/jobs/[^"]+/thumbs/[^"]+)"', first.text)
        assert len(thumbs_on_first) == 47  # 48 tiles, one of them the failed item
        assert 'loading="lazy"' in first.text and 'alt="Studio photo of product 0' in first.text
        nxt = re.search(r'data-next-page href="([^"]+)"', first.text)
        assert nxt is not None
        second = c.get(nxt.group(1).replace("&amp;", "&"))
        assert len(re.findall(r"/thumbs/", second.text)) == 12
        item = c.get(f"/ui/jobs/{job.id}/items/7")
        assert item.status_code == 200 and "blocked by the safety system" in item.text
        manifest = c.get(f"/ui/jobs/{job.id}/manifest.jsonl")
        assert manifest.status_code == 200 and len(manifest.content.splitlines()) == 60
        for path in PAGES:
            assert c.get(path).status_code == 200, path


def test_a_running_jobs_page_shows_its_forecast_and_deadline(console: Console) -> None:
    when = dt.datetime.fromtimestamp(time.time() + 7200, dt.UTC).isoformat()
    job = submit(console.ctx, 5, tenant="acme", deadline=when, on_deadline="sync")
    with console.signed_in("acme") as c:
        live = c.get(f"/ui/jobs/{job.id}/live")
    assert live.status_code == 200
    # No batch of the model has completed here yet: it says so rather than guess.
    assert "No forecast yet: no history" in live.text
    assert 'data-testid="deadline"' in live.text and "finish on the sync lane" in live.text
    assert "(all sync)" in live.text  # the worst case beside the expected cost


def test_thumbnails_are_made_once_small_and_served_with_the_session(console: Console) -> None:
    job = ended_job(console.ctx, 2, tenant="acme")
    storage = console.ctx.storage
    image = f"jobs/{job.id}/images/sku-1.png"
    sha = thumbs.source_hash(storage, image)
    assert not storage.exists(thumb_key(image, sha))
    with console.signed_in("acme") as c:
        first = c.get(f"/ui/jobs/{job.id}/thumbs/sku-1.png")
        assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(first.content)) as img:
            assert max(img.size) <= 256 and img.format == "WEBP"
        assert storage.exists(thumb_key(image, sha))  # stored beside the image
        again = c.get(
            f"/ui/jobs/{job.id}/thumbs/sku-1.png", headers={"If-None-Match": first.headers["etag"]}
        )
        assert again.status_code == 304
        full = c.get(f"/ui/jobs/{job.id}/images/sku-1.png")
        assert full.status_code == 200 and full.headers["content-type"] == "image/png"
        assert c.get(f"/ui/jobs/{job.id}/thumbs/..%2Fmanifest.jsonl").status_code == 404
    with httpx2.Client(base_url=console.url) as anonymous:
        assert anonymous.get(f"/ui/jobs/{job.id}/thumbs/sku-1.png").status_code == 303


def test_review_and_redo_through_forms(console: Console) -> None:
    job = ended_job(console.ctx, 6, tenant="acme")
    gallery = f"/ui/jobs/{job.id}/gallery"
    with console.signed_in("acme") as c:
        token = csrf_of(c.get(gallery).text)
        resp = c.post(
            f"/ui/jobs/{job.id}/review",
            data={
                "csrf": token,
                "item": ["1:sku-1", "4:sku-4"],
                "decision": "rejected",
                "note": "label is cut off",
                "back": gallery,
            },
        )
        assert resp.status_code == 303 and resp.headers["location"] == gallery
        assert console.ctx.store.review_counts(job.id) == {"rejected": 2}
        rejected = c.get(f"{gallery}?show=rejected").text
        assert rejected.count('class="tile is-rejected"') == 2 and "label is cut off" in rejected
        form = c.get(f"/ui/jobs/{job.id}/redo", params={"item": ["1:sku-1"]})
        assert form.status_code == 200 and "Studio photo of product 1 on white" in form.text
        redo = c.post(
            f"/ui/jobs/{job.id}/redo",
            data={
                "csrf": token,
                "item": "1:sku-1",
                "prompt:1": "Studio photo of product 1, label whole",
            },
        )
        assert redo.status_code == 303
    # The job had finished: the item runs again in the same job, with the edited prompt, and
    # its decision is cleared (its image will be new); the other rejected one stays rejected.
    assert redo.headers["location"] == f"/ui/jobs/{job.id}"
    again = console.ctx.store.job(job.id)
    assert again is not None and again.status == "queued" and again.retries == 1
    assert console.ctx.store.review_counts(job.id) == {"rejected": 1}
    line = next(pages.item_lines(console.ctx, again, 1))[1]
    assert line.body["prompt"] == "Studio photo of product 1, label whole"


def test_redo_of_a_running_jobs_items_is_a_new_job_of_them(console: Console) -> None:
    job = ended_job(console.ctx, 4, tenant="acme", finish=False)
    with console.signed_in("acme") as c:
        token = csrf_of(c.get(f"/ui/jobs/{job.id}/gallery").text)
        c.post(
            f"/ui/jobs/{job.id}/review",
            data={"csrf": token, "item": "2:sku-2", "decision": "rejected"},
        )
        redo = c.post(
            f"/ui/jobs/{job.id}/redo",
            data={"csrf": token, "item": "2:sku-2", "prompt:2": "Product 2, brighter"},
        )
        assert redo.status_code == 303
    new_id = redo.headers["location"].rsplit("/", 1)[-1]
    redone = console.ctx.store.job(new_id)
    assert new_id != job.id and redone is not None and redone.items == 1
    assert redone.labels["redo_of"] == job.id
    record = console.ctx.redis.hget(keys.job_review(job.id), "2")
    assert record is not None and new_id.encode() in record


def test_retry_failed_items_from_the_job_page(console: Console) -> None:
    job = ended_job(console.ctx, 5, tenant="acme", fail={1, 3})
    with console.signed_in("acme") as c:
        page = c.get(f"/ui/jobs/{job.id}")
        assert "Retry 2 failed" in page.text
        resp = c.post(f"/ui/jobs/{job.id}/retry", data={"csrf": csrf_of(page.text)})
        assert resp.status_code == 303
    assert resp.headers["location"] == f"/ui/jobs/{job.id}"  # in place
    again = console.ctx.store.job(job.id)
    assert again is not None and again.status == "queued"
    assert console.ctx.store.counts(job.id)["pending"] == 2


def test_schedules_are_made_paused_resumed_run_and_deleted_from_the_page(console: Console) -> None:
    catalog = next(console.ctx.settings.local_ref_roots[0].glob("products.csv")).as_uri()
    with console.signed_in("acme") as c:
        page = c.get("/ui/schedules")
        assert page.status_code == 200 and "No schedules yet" in page.text
        token = csrf_of(page.text)
        form = {
            "csrf": token,
            "name": "weekly mugs",
            "cron": "0 6 * * 1",
            "timezone": "UTC",
            "catalog_url": catalog,
            "template": "Studio photo of a {title}",
            "quality": "low",
            "size": "1024x1024",
            "campaign": "weekly",
        }
        bad = c.post("/ui/schedules", data={**form, "cron": "every day"})
        assert bad.status_code == 422 and "cron" in bad.text
        assert c.post("/ui/schedules", data=form).status_code == 303
        listed = c.get("/ui/schedules").text
        assert "weekly mugs" in listed and "0 6 * * 1" in listed and "paused" not in listed
        sid = re.search(r'/ui/schedules/([^/"]+)/run', listed)
        assert sid is not None
        schedule = sid.group(1)
        assert c.post(f"/ui/schedules/{schedule}/pause", data={"csrf": token}).status_code == 303
        assert "paused" in c.get("/ui/schedules").text
        assert c.post(f"/ui/schedules/{schedule}/resume", data={"csrf": token}).status_code == 303
        run = c.post(f"/ui/schedules/{schedule}/run", data={"csrf": token})
        assert run.status_code == 303
        job_id = run.headers["location"].rsplit("/", 1)[-1]
        job = console.ctx.store.job(job_id)
        assert job is not None and job.items == 2 and job.labels["schedule"] == schedule
        assert job_id in c.get("/ui/", params={"schedule": schedule}).text
    with console.signed_in("rival") as other:
        token = csrf_of(other.get("/ui/schedules").text)
        assert (
            other.post(f"/ui/schedules/{schedule}/pause", data={"csrf": token}).status_code == 404
        )
        assert "weekly mugs" not in other.get("/ui/schedules").text
    with console.signed_in("acme") as c:
        assert c.post(f"/ui/schedules/{schedule}/delete", data={"csrf": token}).status_code == 403
        token = csrf_of(c.get("/ui/schedules").text)
        assert c.post(f"/ui/schedules/{schedule}/delete", data={"csrf": token}).status_code == 303
        assert "weekly mugs" not in c.get("/ui/schedules").text
