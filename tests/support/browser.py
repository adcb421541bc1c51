"""A real headless Chromium for tests: Debian's ``chromium`` driven through its matching
``chromedriver`` by Selenium 4, with nothing downloaded (the network here is closed).

:func:`start_browser` gives a driver on a fresh profile; :class:`Screens` saves a screenshot of
each page a test visits under ``IMAGEBATCH_SCREENSHOTS`` (default ``test-artifacts/screenshots``,
kept by CI as an artifact). The test is skipped where Chromium is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("IMAGEBATCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IMAGEBATCH_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
REPO = Path(__file__).resolve().parents[2]


def start_browser(profile: Path, width: int = 1280, height: int = 900) -> Any:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver;"
            " .ci/run does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


class Screens:
    """Numbered screenshots of what the test saw."""

    def __init__(self) -> None:
        self.dir = Path(
            os.environ.get("IMAGEBATCH_SCREENSHOTS", REPO / "test-artifacts/screenshots")
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        print(f"screenshots in {self.dir}")

    def shot(self, driver: Any, name: str) -> Path:
        self.n += 1
        path = self.dir / f"{self.n:02d}-{name}.png"
        driver.save_screenshot(str(path))
        return path
