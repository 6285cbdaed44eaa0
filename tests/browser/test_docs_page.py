"""GET /docs in a real browser: Debian's Chromium, headless, driven by chromedriver through Selenium, against
the service under its production Gunicorn configuration.

`make test-browser`, not part of `make test` (it installs `chromium` and `chromium-driver` with apt-get when
they are missing). The test does what a person would: opens `POST /predict`, asks to try it out, executes the
example trip and reads the answer from the page. And it checks that the page fetched nothing from anywhere
but the service: every resource the browser loaded is on 127.0.0.1, and the page's Content-Security-Policy
refused nothing (a refused load would leave no resource entry behind).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import service_env
from harness import start_gunicorn, stop
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from bikeshare_membership.config import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 30
OPERATION = "#operations-default-predict"  # Swagger UI's id: the tag (none, so `default`) and the operationId
# Before any of the page's own scripts: remember every load the Content-Security-Policy refuses.
RECORD_REFUSED = """
window.refusedByPolicy = [];
document.addEventListener("securitypolicyviolation",
    (event) => window.refusedByPolicy.push(`${event.violatedDirective} ${event.blockedURI}`));
"""


@pytest.fixture(scope="module")
def service(
    settings: Settings, trained: subprocess.CompletedProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    process, url = start_gunicorn(service_env(settings), tmp_path_factory.mktemp("browser") / "gunicorn.log")
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make test-browser` installs chromium and chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root, as here and in CI, has no sandbox
        "--disable-dev-shm-usage",
        "--window-size=1280,2400",
        # Nothing of the browser's own reaches out either: no updates, no background requests.
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_REFUSED})
        yield driver
    finally:
        driver.quit()


def _click(driver: WebDriver, element: WebElement) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.element_to_be_clickable(element)).click()


def test_try_it_out_predicts_the_example_trip(service: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, WAIT_SECONDS)
    browser.get(f"{service}/docs")
    try:
        summary = wait.until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f"{OPERATION} .opblock-summary-control"))
        )
        assert "/predict" in summary.text
        _click(browser, summary)
        operation = browser.find_element(By.CSS_SELECTOR, OPERATION)
        # Try it out is on from the start (tryItOutEnabled), so its button reads "Cancel": off, then on again
        # with the "Try it out" button, as a person who had cancelled would.
        toggle = wait.until(lambda _: operation.find_element(By.CSS_SELECTOR, ".try-out__btn"))
        assert toggle.text.strip() == "Cancel"
        _click(browser, toggle)
        wait.until(lambda _: operation.find_element(By.CSS_SELECTOR, ".try-out__btn").text.strip() == "Try it out")
        _click(browser, operation.find_element(By.CSS_SELECTOR, ".try-out__btn"))
        body = wait.until(lambda _: operation.find_element(By.CSS_SELECTOR, "textarea.body-param__text"))
        example = json.loads(body.get_attribute("value") or "")
        assert example["trip_id"] == 712382 and example["from_station_name"] == "Wellesley St E / Yonge St Green P"
        _click(browser, operation.find_element(By.CSS_SELECTOR, "button.execute"))
        status = wait.until(
            lambda _: operation.find_element(By.CSS_SELECTOR, ".live-responses-table .response .response-col_status")
        )
        answer_block = wait.until(
            lambda _: operation.find_element(
                By.CSS_SELECTOR, ".live-responses-table .response .response-col_description pre"
            )
        )
        wait.until(lambda _: "membership" in answer_block.text)
        assert status.text.strip() == "200"
        answer = json.loads(answer_block.text)
        assert answer["membership"] in ("Member", "Casual") and answer["trip_id"] == 712382
        assert answer["model"]["name"] and 0 <= answer["proba"] <= 100

        loaded = browser.execute_script(
            "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
            ".map((entry) => entry.name)"
        )
        assert f"{service}/openapi.json" in loaded and f"{service}/predict" in loaded
        assert [url for url in loaded if not url.startswith(f"{service}/")] == [], "fetched from elsewhere"
        assert browser.execute_script("return window.refusedByPolicy") == [], "the page tried to fetch elsewhere"
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        browser.save_screenshot(str(tmp_path / "docs.png"))
