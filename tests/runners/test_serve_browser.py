"""The demo page in a real browser: headless Chromium (Debian's, driven by Selenium) uploads, asks, sees the answer.

Skipped when Chromium, its driver or Selenium is missing; `make test-browser` installs them and runs this file.
"""

import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no browser: needs chromium and chromedriver on PATH (make test-browser installs Debian's "
                "chromium and chromium-driver)", allow_module_level=True)

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from features.detectors import DETECTORS  # noqa: E402
from tasks.runners.serve import Demo, create_app, load_checkpoint  # noqa: E402
from tests.fixtures.local_ports import free_port  # noqa: E402
from tests.fixtures.tiny_checkpoints import ANSWERS, save_checkpoint  # noqa: E402
from tests.fixtures.tiny_task_data import write_vocab  # noqa: E402


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The demo on a tiny checkpoint, served by uvicorn in a thread on a free local port."""
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")
    checkpoint = save_checkpoint(tmp_path / "ckpt", answers=ANSWERS)
    write_vocab(checkpoint)
    demo = Demo([load_checkpoint(checkpoint, "cpu", "tiny-test", allow_random=True)], "cpu")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(demo), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _image_loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        f"const im = document.getElementById('{element_id}'); return im.complete && im.naturalWidth > 0;")


def test_page_uploads_an_image_asks_and_shows_the_answer_and_drawings(server, browser, tmp_path):
    image = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 3)
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "text").send_keys("what color is the ball")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    lines = browser.find_element(By.ID, "answers").text.splitlines()
    assert len(lines) == 5 and all(line.split()[1] in ANSWERS for line in lines)
    assert browser.find_element(By.ID, "summary").text.startswith("Q: what color is the ball A: ")  # HTML folds spaces
    wait.until(lambda d: _image_loaded(d, "drawn") and _image_loaded(d, "attention"))
    assert browser.execute_script("return document.getElementById('drawn').naturalWidth") == 80

    # a refused request shows its message on the page
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "the text is empty" in browser.find_element(By.ID, "error").text
    assert not browser.find_element(By.ID, "result").is_displayed()
