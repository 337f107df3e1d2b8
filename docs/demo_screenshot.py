"""Take the docs screenshot of the demo page (docs/images/demo.png): `make demo-screenshot`, or

  python -m docs.demo_screenshot --checkpoint runs/multi_embedded/checkpoints/step-00000700 \
      --examples data/shapes/world --task vqa --example 1618 --text "what color is the triangle?" \
      --out docs/images/demo.png

Serves the checkpoint(s) as `vilbert serve` does, asks one task about shapes-world test image(s) (`--example`) or
about uploaded image files (`--image`, found by the checkpoint's detector, no boxes given) in headless Chromium
(offline, as the browser test: tests/fixtures/browser.py) and saves the whole page. It prints the model's answer
and, for a VQA question about a shapes-world image (a test example, or an uploaded file from the `images/` folder
of any world, such as one of another seed), the world's ground-truth answer, so that a wrong answer is seen before
the picture is committed. Needs the dev and serve extras and Debian's chromium and chromium-driver
(`make test-browser` installs them).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import uvicorn
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tasks.runners.serve import Demo, create_app, load_examples
from tasks.runners.serving import load_all
from tests.fixtures.browser import offline_chrome
from tests.fixtures.local_ports import free_port


def ground_truth(world: Path, image_id: str, question: str) -> list[str] | None:
    """The human answers of `question` about image `image_id` in the world's VQA files (any split), if it is one."""
    questions, annotations = [], []
    for folder in sorted((world / "vqa").glob("*")):
        try:
            questions += json.loads(next(folder.glob("*_questions.json")).read_text())["questions"]
            annotations += json.loads(next(folder.glob("*_annotations.json")).read_text())["annotations"]
        except (OSError, ValueError, KeyError, StopIteration):
            continue
    wanted = {q["question_id"] for q in questions
              if str(q["image_id"]) == image_id and q["question"].strip(" ?").lower() == question.strip(" ?").lower()}
    answers = [a["multiple_choice_answer"] for a in annotations if a["question_id"] in wanted]
    return answers or None


def world_image_id(path: Path) -> tuple[Path, str] | None:
    """(world, image id) of an image file in a shapes world's `images/` folder, else None."""
    world = path.resolve().parent.parent
    try:
        scenes = json.loads((world / "scenes.json").read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ids = [str(s["image_id"]) for s in scenes if s.get("file_name") == path.name]
    return (world, ids[0]) if ids else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--examples", required=True, help="the shapes world directory")
    parser.add_argument("--task", required=True)
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--example", action="append", help="a test image id of --examples (NLVR2: two)")
    images.add_argument("--image", action="append", type=Path, help="an image file to upload (NLVR2: two)")
    parser.add_argument("--text", default=None)
    parser.add_argument("--candidates", default=None, help="candidate texts, one per line")
    parser.add_argument("--out", default="docs/images/demo.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--detector", help="default: the detector of each checkpoint's training features")
    parser.add_argument("--random-detector", action="store_true", help="allow a detector without trained weights")
    args = parser.parse_args(argv)

    served = load_all(args.checkpoint, "cpu", args.detector, args.random_detector)
    demo = Demo(served, "cpu", load_examples(args.examples))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(demo), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with offline_chrome(args.width, 1000) as (driver, proxy):
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#task option"))
            Select(driver.find_element(By.ID, "task")).select_by_value(args.task)
            for slot, example in enumerate(args.example or []):
                Select(driver.find_element(By.ID, f"example{slot}")).select_by_value(example)
            for slot, image in enumerate(args.image or []):
                driver.find_element(By.ID, f"image{slot}").send_keys(str(image.resolve()))
            for field, value in (("text", args.text), ("candidates", args.candidates)):
                if value is not None:
                    driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").text)
            error = driver.find_element(By.ID, "error").text
            if error:
                raise SystemExit(f"the page refused the request: {error}")
            wait.until(lambda d: d.execute_script(
                "return [...document.images].every((im) => im.hidden || !im.src || (im.complete && im.naturalWidth))"))
            print(driver.find_element(By.ID, "summary").text)
            print(driver.find_element(By.ID, "answers").text)
            if args.task == "vqa" and args.text:
                where = (Path(args.examples), args.example[0]) if args.example else world_image_id(args.image[0])
                print(f"ground truth: {ground_truth(*where, args.text) if where else 'unknown (not a shapes-world image)'}")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, height + 100)
            driver.save_screenshot(args.out)
            print(f"screenshot -> {args.out}")
        if proxy.seen:
            print(f"warning: Chromium tried to reach outside addresses: {proxy.seen}")
    finally:
        server.should_exit = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
