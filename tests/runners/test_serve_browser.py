"""The demo page in a real browser: headless Chromium (Debian's, driven by Selenium) asks every kind of task of a
tiny multi-task checkpoint, sees each answer, each refused request's one line, and a page that fits its window.

Offline by construction (tests/fixtures/browser.py): Selenium Manager never runs (a test fails if it is called) and
every request Chromium makes that is not to this machine goes to a recording proxy, which must see none. `make
test-browser` also runs this file in a network namespace with only loopback, where it must pass. Skipped when
Chromium, its driver or Selenium is missing; `make test-browser` installs them and runs this file.
"""

import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
from tests.fixtures.browser import CHROMEDRIVER, CHROMIUM, offline_chrome  # noqa: E402

if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no browser: needs chromium and chromedriver on PATH (make test-browser installs Debian's "
                "chromium and chromium-driver)", allow_module_level=True)

import uvicorn  # noqa: E402
from selenium.webdriver.common import selenium_manager  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from features.detectors import DETECTORS  # noqa: E402
from tasks.runners.serve import Demo, create_app, load_examples  # noqa: E402
from tasks.runners.serving import load_all  # noqa: E402
from tasks.shapes.world import write_shapes_world  # noqa: E402
from tests.fixtures.local_ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_multitask_checkpoint, tmp_path_factory):
    """The demo on the tiny multi-task checkpoint with a tiny shapes world, served by uvicorn in a thread."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DETECTORS, "tiny-test-16", "tests.fixtures.tiny_multitask:build_wide_tiny_detector")
        tasks = load_all([str(tiny_multitask_checkpoint)], "cpu", "tiny-test-16", allow_random=True)
        world = tmp_path_factory.mktemp("browser") / "world"
        write_shapes_world(world, seed=3, num_images=20, progress=False)
        demo = Demo(tasks, "cpu", load_examples(world))
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(create_app(demo), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/", sorted(demo.examples.images, key=int)
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/fixtures/browser.py); Selenium Manager may not run, no request may leave."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selenium_manager.SeleniumManager, "binary_paths",
                      lambda *args: pytest.fail("Selenium Manager ran (it downloads drivers, sends statistics)"))
        with offline_chrome() as (driver, proxy):
            yield driver
    assert proxy.seen == [], f"Chromium tried to reach outside addresses: {proxy.seen}"


def _image_loaded(driver, element) -> bool:
    return driver.execute_script("const im = arguments[0]; return im.complete && im.naturalWidth > 0;", element)


def _ask(driver, url, task, text=None, candidates=None, examples=(), uploads=()):
    """Fill the form for `task` as a user would, submit, and wait for the answer or the error."""
    if not driver.current_url.startswith(url):
        driver.get(url)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) > 0)
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    driver.execute_script("""for (const i of [0, 1]) {  // a fresh form: no file, no example in either slot
        document.getElementById(`image${i}`).value = "";
        document.getElementById(`example${i}`).value = "";
        document.getElementById(`preview${i}`).hidden = true; }""")
    for slot, example in enumerate(examples):
        Select(driver.find_element(By.ID, f"example{slot}")).select_by_value(example)
    for slot, path in enumerate(uploads):
        driver.find_element(By.ID, f"image{slot}").send_keys(str(path))
    for field, value in (("text", text), ("candidates", candidates)):
        if value is not None:
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text)
    return wait


def _check_answer(driver, wait, images: int) -> list[str]:
    """The answer's lines, once its summary, drawing and one attention figure per image have rendered."""
    assert driver.find_element(By.ID, "error").text == ""
    assert driver.find_element(By.ID, "summary").text
    wait.until(lambda d: _image_loaded(d, d.find_element(By.ID, "drawn")))
    figures = driver.find_elements(By.CSS_SELECTOR, "#attention img")
    assert len(figures) == images
    wait.until(lambda d: all(_image_loaded(d, f) for f in figures))
    return driver.find_element(By.ID, "answers").text.splitlines()


def _fits(driver) -> bool:
    """Nothing sticks out sideways: no horizontal scroll, every image inside the window, no text cut."""
    return driver.execute_script("""
        const width = document.documentElement.clientWidth;
        if (document.documentElement.scrollWidth > width) return false;
        for (const img of document.querySelectorAll("img")) {
          if (img.offsetParent !== null && img.getBoundingClientRect().right > width + 1) return false;
        }
        const summary = document.getElementById("summary");
        return summary.scrollWidth <= summary.clientWidth;""")


def test_every_kind_of_task_answers_on_the_page(server, browser, tmp_path):
    url, examples = server
    first, second = examples[:2]
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(upload)

    # a question on an uploaded 64 px image: drawn at a readable size, the question never cut
    wait = _ask(browser, url, "vqa", text="what color is the circle on the left of the big square",
                uploads=[upload])
    lines = _check_answer(browser, wait, 1)
    assert browser.find_element(By.ID, "summary").text.startswith("Q: what color is the circle on the left")
    assert len(lines) >= 3 and lines[0].startswith("Q: ")  # the question, then the top answers
    assert browser.execute_script("return document.getElementById('drawn').naturalWidth") == 640
    assert _fits(browser)

    for task, text in (("gqa", "what color is the circle"), ("refcoco", "the red circle"),
                       ("visual7w", "which is the red circle?"), ("snli-ve", "there is a red circle")):
        wait = _ask(browser, url, task, text=text, examples=[first])
        lines = _check_answer(browser, wait, 1)
        assert text in browser.find_element(By.ID, "summary").text and len(lines) >= 2, task
    assert "entailment" in browser.find_element(By.ID, "answers").text  # SNLI-VE names its three labels

    # captions: the page asks for candidates, not for a text
    wait = _ask(browser, url, "retrieval", candidates="a red circle\nthree blue squares", examples=[first])
    assert not browser.find_element(By.ID, "text-field").is_displayed()
    answer = "\n".join(_check_answer(browser, wait, 1))
    assert "a red circle" in answer and "three blue squares" in answer

    # two images and a statement: two attention figures, the pair drawn side by side
    wait = _ask(browser, url, "nlvr2", text="the left image has more circles than the right image",
                examples=[first, second])
    assert browser.find_element(By.ID, "image1-label").text == "Right image"
    lines = _check_answer(browser, wait, 2)
    assert {line.split()[1] for line in lines[1:]} == {"True", "False"}

    # multiple choice: the four answers ranked
    options = ["it is paint", "the light", "it is a tomato", "no reason"]
    wait = _ask(browser, url, "vcr-qa", text="why is the circle red?", candidates="\n".join(options),
                examples=[first])
    assert "Exactly 4 answers" in browser.find_element(By.ID, "candidates-label").text
    lines = _check_answer(browser, wait, 1)
    assert sorted(line.split(None, 1)[1].rsplit(None, 1)[0] for line in lines[1:]) == sorted(options)
    assert _fits(browser)


@pytest.mark.parametrize("width", [1100, 1280, 375])
def test_the_page_fits_common_widths_and_a_phone(server, browser, width):
    url, examples = server
    browser.set_window_size(width, 900)
    try:
        wait = _ask(browser, url, "nlvr2", text="the left image has more circles than the right image " * 3,
                    examples=examples[:2])
        _check_answer(browser, wait, 2)
        assert _fits(browser), f"the page does not fit {width} px"
    finally:
        browser.set_window_size(1100, 1000)


def test_each_bad_input_shows_its_one_line_error(server, browser, tmp_path):
    url, examples = server
    notes = tmp_path / "notes.png"
    notes.write_text("these are my notes")
    cases = [
        (dict(task="nlvr2", text="the left one", examples=examples[:1]),
         "nlvr2 reads 2 image(s) (left image, right image), got 1"),
        (dict(task="vcr-qa", text="why?", candidates="a\nb\nc", examples=examples[:1]),
         "vcr-qa chooses among exactly 4 answers, got 3"),
        (dict(task="retrieval", candidates=" ", examples=examples[:1]), "retrieval needs captions to choose from"),
        (dict(task="snli-ve", text=" ", examples=examples[:1]), "snli-ve needs a hypothesis; the text is empty"),
        (dict(task="vqa", text="what color"), "vqa reads 1 image(s) (image), got 0"),
        (dict(task="vqa", text="what color", uploads=[notes]), "notes.png: not an image"),
    ]
    for request, message in cases:
        _ask(browser, url, **request)
        error = browser.find_element(By.ID, "error").text
        assert message in error and len(error.splitlines()) == 1, (request["task"], error)
        assert not browser.find_element(By.ID, "result").is_displayed()
