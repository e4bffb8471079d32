"""The page GET / serves, in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): open it, start a prompt, see frames drawn (the canvas pixels change), change the prompt,
stop."""
from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver; .ci/run installs them)")

from serve_util import Server, tiny_pipeline  # noqa: E402

CANVAS = "const c = document.getElementById('view'); return Array.from(c.getContext('2d')" \
         ".getImageData(0, 0, c.width, c.height).data);"


def wait_for(fn, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_page_plays_frames_changes_prompt_and_stops():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By

    server = Server(tiny_pipeline(1), ahead=2, idle_timeout=10)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=opts)
    try:
        driver.get(server.url + "/")
        page = lambda key: driver.execute_script(f"return window.graphrtPage.{key};")  # noqa: E731
        blank = driver.execute_script(CANVAS)
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys("a red fox")
        driver.find_element(By.ID, "start").click()
        wait_for(lambda: page("drawn") >= 3, what="frames drawn on the canvas")
        first = driver.execute_script(CANVAS)
        assert first != blank                                           # pixels drawn
        wait_for(lambda: driver.execute_script(CANVAS) != first, what="the next frame")   # and they move
        assert page("chunks") >= 1                                      # chunks acknowledged whole
        assert int(driver.find_element(By.ID, "frames").text) >= 3
        assert driver.find_element(By.ID, "latency").text.isdigit()

        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys("a blue bird")
        driver.find_element(By.ID, "change").click()
        # the server answers the switch: confirmed (type "prompt") or, without VideoPipeline.set_prompt,
        # an error message; either way the stream goes on
        reply = wait_for(lambda: [m for m in page("messages") if m["type"] in ("prompt", "error")],
                         what="the answer to the prompt change")
        assert reply[0].get("prompt") == "a blue bird" or "set_prompt" in reply[0]["message"]
        drawn = page("drawn")
        wait_for(lambda: page("drawn") > drawn, what="frames after the prompt change")

        driver.find_element(By.ID, "stop").click()
        wait_for(lambda: page("status") == "ended: stopped", what="the end of the stream")
        wait_for(lambda: server.http("GET", "/v1/models")[2]["free_sessions"] == 1, what="the slot freed")
    finally:
        driver.quit()
        server.close()
