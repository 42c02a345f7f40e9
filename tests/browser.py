"""A headless Chromium driven by selenium, for the viewer tests (Debian: chromium + chromium-driver,
installed by .ci/run). Skips only where no Chromium is installed, and never under CI."""

from __future__ import annotations

import os
import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def find(names) -> "str | None":
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def chrome(width: int = 1200, height: int = 800):
    """A started headless Chromium WebDriver (the caller quits it)."""
    browser, driver = find(BROWSERS), find(DRIVERS)
    if browser is None or driver is None:
        missing = "chromium" if browser is None else "chromedriver"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not found under CI: .ci/run installs chromium and chromium-driver")
        pytest.skip(f"{missing} not found (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)
