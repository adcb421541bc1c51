"""The console in a real headless Chromium against the whole stack with two tenants.

What a user does and would notice: sign in with a key; a job submitted a moment ago is in the
list; its page shows progress move to the end by itself; the gallery shows every image of a
60-item job across its pages, each one loaded; two images rejected, one redone with an edited
prompt and seen made again; the other tenant's job is not there by its URL; a form posted
without its CSRF token is refused; a new job estimated and submitted from the page; spend drawn.
A screenshot of each page is saved (tests/support/browser.py says where).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from service.tenants import digest_key, new_key
from tests.support.browser import Screens, start_browser
from tests.support.procs import wait_until
from tests.support.simulator import SimulatorHandle, start_simulator
from tests.support.stack import Stack, job_body

pytestmark = pytest.mark.slow
FINAL = ("succeeded", "partially_failed", "failed", "cancelled", "budget_exhausted")


class World:
    def __init__(self, stack: Stack, keys: dict[str, str], driver: Any, screens: Screens):
        self.stack, self.keys, self.driver, self.screens = stack, keys, driver, screens

    def submit(self, tenant: str, body: dict[str, Any]) -> str:
        job = self.stack.submit(body, Authorization=f"Bearer {self.keys[tenant]}")
        return str(job["id"])

    def wait_final(self, tenant: str, job_id: str) -> dict[str, Any]:
        with self.stack.client(headers={"Authorization": f"Bearer {self.keys[tenant]}"}) as c:
            return wait_until(
                lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in FINAL and j,
                timeout=120,
                interval=0.3,
                message=f"job {job_id} to finish",
            )

    def go(self, path: str) -> None:
        self.driver.get(self.stack.api + path)

    def sign_in(self, tenant: str) -> None:
        self.go("/ui/")
        wait_until(lambda: "/ui/sign-in" in self.driver.current_url, message="the sign-in page")
        self.driver.find_element(By.ID, "key").send_keys(self.keys[tenant])
        self.driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait_until(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, ".tenant"), message="signed in"
        )

    def sign_out(self) -> None:
        self.driver.find_element(By.CSS_SELECTOR, ".who button").click()
        wait_until(lambda: "/ui/sign-in" in self.driver.current_url, message="signed out")

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def etag(self, src: str) -> str:
        """The ETag the console serves a thumbnail with: the hash of the image it shows."""
        return str(
            self.driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "fetch(arguments[0], {cache: 'no-store'}).then(r => done(r.headers.get('etag')));",
                src,
            )
        )

    def loaded_images(self) -> list[tuple[str, str]]:
        """Scroll every gallery image into view and wait until each has decoded; (alt, src)."""
        images = self.driver.find_elements(By.CSS_SELECTOR, ".gallery img")
        for img in images:
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
            wait_until(
                lambda img=img: self.driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", img
                ),
                timeout=30,
                message=f"image {img.get_attribute('src')} to load",
            )
        return [(i.get_attribute("alt"), i.get_attribute("src")) for i in images]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[World]:
    import redis

    tmp = tmp_path_factory.mktemp("console-e2e")
    keys = {"acme": new_key(), "rival": new_key()}
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        "\n".join(f'[tenants.{t}]\nkey_sha256 = ["{digest_key(k)}"]\n' for t, k in keys.items())
        + "daily_usd = 40.0\n"
    )
    redis.Redis.from_url(redis_url).flushdb()
    sim: SimulatorHandle = start_simulator(
        tmp / "sim", rate=12, validate_seconds=1, finalize_seconds=0.5
    )
    stack = Stack(
        tmp / "stack",
        redis_url,
        sim.url,
        env={"IMAGEBATCH_TENANTS_FILE": str(tenants), "IMAGEBATCH_BATCH_MAX_LINES": "30"},
    )
    stack.tmp.mkdir(parents=True, exist_ok=True)
    stack.start()
    driver = start_browser(tmp / "profile")
    try:
        yield World(stack, keys, driver, Screens())
    finally:
        driver.quit()
        stack.stop()
        sim.stop()


def test_a_job_from_list_to_live_progress_to_gallery_review_and_redo(world: World) -> None:
    driver, shot = world.driver, world.screens.shot
    world.go("/ui/")
    shot(driver, "sign-in")
    world.sign_in("acme")

    job_id = world.submit("acme", job_body(60, labels={"campaign": "spring-sale"}))
    world.go("/ui/")
    assert job_id in world.text("table.rows")
    shot(driver, "jobs")

    # Its page follows the job to the end by itself: the test never reloads it.
    driver.find_element(By.LINK_TEXT, job_id).click()
    seen: list[str] = []

    def finished() -> bool:
        status = driver.find_element(By.CSS_SELECTOR, "[data-status]").get_attribute("data-status")
        seen.append(f"{status}: {world.text('[data-testid=progress-text]')}")
        if len(seen) == 2:
            shot(driver, "job-running")
        return status in FINAL

    wait_until(finished, timeout=120, interval=0.25, message="the job page to show the end")
    assert not seen[0].startswith(FINAL), seen  # it was seen running, then finished
    assert world.text("[data-testid=progress-text]") == "60 of 60 items ended", seen
    assert world.text("[data-status]") == "succeeded"
    shot(driver, "job-finished")

    # Every image of the job, across the gallery's pages, each one decoded.
    driver.find_element(By.LINK_TEXT, "Gallery").click()
    shot(driver, "gallery")
    alts: list[str] = []
    while True:
        alts += [alt for alt, _ in world.loaded_images()]
        more = driver.find_elements(By.CSS_SELECTOR, "[data-next-page]")
        if not more:
            break
        more[0].click()
    assert sorted(alts) == sorted(f"Studio photo of product {i} on white" for i in range(60))

    # Reject two, with a note; the gallery shows them rejected.
    world.go(f"/ui/jobs/{job_id}/gallery")
    for ref in ("3:sku-3", "5:sku-5"):
        driver.find_element(By.CSS_SELECTOR, f'input[name=item][value="{ref}"]').click()
    driver.find_element(By.ID, "review-note").send_keys("label cut off")
    driver.find_element(By.CSS_SELECTOR, "button[value=rejected]").click()
    wait_until(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, ".tile.is-rejected")) == 2,
        message="two rejected tiles",
    )
    shot(driver, "gallery-rejected")

    # The lightbox: open one, move with the keyboard, close with Escape.
    driver.find_element(By.CSS_SELECTOR, '.tile[data-index="3"] a.shot').click()
    wait_until(
        lambda: driver.find_elements(By.CSS_SELECTOR, "dialog[open] .detail"), message="lightbox"
    )
    assert "sku-3" in world.text("dialog .detail h2")
    shot(driver, "lightbox")
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    wait_until(lambda: "sku-4" in world.text("dialog .detail h2"), message="the next item")
    ActionChains(driver).send_keys(Keys.ARROW_LEFT).perform()
    wait_until(lambda: "sku-3" in world.text("dialog .detail h2"), message="back to sku-3")

    # Redo sku-3 with an edited prompt, and see its new image.
    before = world.etag(
        driver.find_element(By.CSS_SELECTOR, '.tile[data-index="3"] img').get_attribute("src")
    )
    edited = "Studio photo of product 3 with its label whole"
    box = driver.find_element(By.CSS_SELECTOR, "dialog textarea[name='prompt:3']")
    box.clear()
    box.send_keys(edited)
    driver.find_element(By.CSS_SELECTOR, "dialog [data-redo-form] button[type=submit]").click()
    wait_until(lambda: "/gallery" not in driver.current_url, message="the redo to start")
    redo_job = driver.current_url.rstrip("/").rsplit("/", 1)[-1]
    world.wait_final("acme", redo_job)
    world.go(f"/ui/jobs/{redo_job}/gallery" if redo_job != job_id else f"/ui/jobs/{job_id}/gallery")
    images = dict(world.loaded_images())
    assert edited in images, images.keys()
    assert world.etag(images[edited]) != before  # a new image, not the old one under a new name
    tile = driver.find_element(By.CSS_SELECTOR, f'.gallery img[alt="{edited}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", tile)
    shot(driver, "redone")


def test_other_tenants_csrf_new_job_and_spend(world: World) -> None:
    driver, shot = world.driver, world.screens.shot
    theirs = world.submit("acme", job_body(2, prefix="theirs"))
    world.go("/ui/")
    if not driver.find_elements(By.CSS_SELECTOR, ".tenant"):
        world.sign_in("acme")
    world.sign_out()
    world.sign_in("rival")

    # Another tenant's job: not found, by any of its URLs.
    for path in (f"/ui/jobs/{theirs}", f"/ui/jobs/{theirs}/gallery"):
        world.go(path)
        assert "Job not found" in world.text("main"), path
    shot(driver, "other-tenant")

    # A form whose CSRF token was taken out is refused.
    world.go("/ui/new")
    driver.execute_script("document.querySelector('form[data-new-job] input[name=csrf]').remove()")
    driver.find_element(By.CSS_SELECTOR, "input[value=json]").click()
    driver.find_element(By.ID, "json_text").send_keys('{"items": [{"prompt": "a red mug"}]}')
    driver.find_element(By.CSS_SELECTOR, "button[value=submit]").click()
    wait_until(lambda: "Form refused" in world.text("main"), message="the refusal")
    shot(driver, "csrf-refused")

    # A new job from the page: estimated, then submitted.
    world.go("/ui/new")
    driver.find_element(By.CSS_SELECTOR, "input[value=json]").click()
    body = (
        '{"model": "gpt-image-2", "items": [{"id": "mug", "prompt": "A red mug"}, '
        '{"id": "cup", "prompt": "A blue cup"}], "labels": {"campaign": "autumn"}}'
    )
    driver.find_element(By.ID, "json_text").send_keys(body)
    driver.find_element(By.CSS_SELECTOR, "button[value=estimate]").click()
    wait_until(
        lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=estimate]"), message="estimate"
    )
    assert "items\n2" in world.text("[data-testid=estimate]").lower()
    shot(driver, "new-job-estimate")
    driver.find_element(By.CSS_SELECTOR, "button[value=submit]").click()
    wait_until(lambda: "/ui/jobs/job_" in driver.current_url, message="the new job's page")
    mine = driver.current_url.rsplit("/", 1)[-1]
    world.wait_final("rival", mine)

    # The same job again: its estimate says both images are already there, at no cost.
    world.go("/ui/new")
    driver.find_element(By.CSS_SELECTOR, "input[value=json]").click()
    driver.find_element(By.ID, "json_text").send_keys(body)
    driver.find_element(By.CSS_SELECTOR, "button[value=estimate]").click()
    wait_until(
        lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=reuse]"),
        message="the estimate to count reused images",
    )
    assert world.text("[data-testid=reuse]").startswith("2 of the 2 items match")
    shot(driver, "new-job-reuse")

    world.go("/ui/spend")
    wait_until(
        lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=spend-chart] rect"),
        message="the chart",
    )
    assert "autumn" in world.text("main")
    shot(driver, "spend")

    # A phone's width: the list and the gallery still read.
    driver.set_window_size(390, 844)
    world.go("/ui/")
    shot(driver, "jobs-phone")
    world.go(f"/ui/jobs/{mine}/gallery")
    world.loaded_images()
    shot(driver, "gallery-phone")
    driver.set_window_size(1280, 900)
