"""A headless Chromium for the ``browser`` tests, driven by selenium, with nothing downloaded.

The browser and its driver come from the system (Debian: ``apt-get install chromium chromium-driver``);
selenium's own driver manager is never asked to fetch one. Without them the tests skip and say so.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

INSTALL_HINT = "apt-get install chromium chromium-driver (Debian/Ubuntu) enables the browser tests"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None."""
    browser = os.environ.get("SACODE_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = os.environ.get("SACODE_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        return None
    return browser, driver


def chromium_driver(width: int = 1400, height: int = 1000):
    """A headless Chromium (selenium WebDriver) with a fresh profile; skips the test when there is none."""
    found = find_chromium()
    if found is None:
        pytest.skip(f"Chromium or chromedriver not found: {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium (it is in the `test` extra)")
    os.environ.setdefault("SE_OFFLINE", "true")          # selenium-manager must not try to download anything
    browser, driver = found
    profile = tempfile.mkdtemp(prefix="sacode-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(120)
    drv.set_script_timeout(180)
    # the window size is the outer size; make the viewport itself `width` wide
    inner = drv.execute_script("return window.innerWidth")
    if inner and inner != width:
        drv.set_window_size(width + (width - inner), height)
    drv._sacode_profile = profile
    return drv


def quit_driver(drv) -> None:
    try:
        drv.quit()
    finally:
        shutil.rmtree(getattr(drv, "_sacode_profile", ""), ignore_errors=True)


def wait_for(fn, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    """Poll ``fn()`` until it returns something truthy; return it, or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
