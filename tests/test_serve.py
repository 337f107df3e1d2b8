"""`vilbert serve` over HTTP (Starlette's TestClient): answers in every mode, and every refused request."""

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from test_predict import _save_checkpoint  # noqa: E402
from tiny_task_data import write_vocab  # noqa: E402

from features.detectors import DETECTORS  # noqa: E402
from tasks.cli import build_parser  # noqa: E402
from tasks.runners.serve import Demo, create_app, load_checkpoint, load_examples  # noqa: E402
from tasks.shapes.world import write_shapes_world  # noqa: E402

ANSWERS = ["red", "blue", "green", "two", "yes", "no"]


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "test_predict:build_tiny_detector")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny checkpoint that says no task (so it serves all three modes), its vocabulary beside it; a tiny world."""
    tmp = tmp_path_factory.mktemp("serve")
    checkpoint = _save_checkpoint(tmp / "ckpt", answers=ANSWERS)
    write_vocab(checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DETECTORS, "tiny-test", "test_predict:build_tiny_detector")
        model = load_checkpoint(checkpoint, "cpu", "tiny-test", allow_random=True)
    write_shapes_world(tmp / "world", seed=3, num_images=12, progress=False)
    return model, load_examples(tmp / "world"), tmp


@pytest.fixture
def client(loaded):
    checkpoint, examples, _ = loaded
    demo = Demo([checkpoint], "cpu", examples, max_upload_bytes=200_000)
    return TestClient(create_app(demo), raise_server_exceptions=False), demo


def _png(hw=(40, 50), mode="RGB", seed=0):
    buffer = io.BytesIO()
    if mode == "RGB":
        pixels = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.new(mode, (hw[1], hw[0])).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data_url):
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def _ask(client, task="0:question", text="what color is the ball", image=None, name="cat.png", **fields):
    files = {"image": (name, image if image is not None else _png(), "image/png")} if image is not False else None
    return client.post("/api/predict", data={"task": task, "text": text, **fields}, files=files)


def test_page_and_tasks_list_every_mode_of_the_checkpoint(client):
    http, _ = client
    page = http.get("/")
    assert page.status_code == 200 and 'id="form"' in page.text and "/api/predict" in page.text
    listed = http.get("/api/tasks").json()
    assert [t["id"] for t in listed["tasks"]] == ["0:question", "0:expression", "0:captions"]
    assert listed["examples"] and http.get(f"/api/examples/{listed['examples'][0]}").status_code == 200


def test_question_answers_from_the_vocabulary_with_the_drawn_image_and_attention(client):
    http, _ = client
    response = _ask(http)
    assert response.status_code == 200, response.text
    result = response.json()
    scores = [a["score"] for a in result["answers"]]
    assert {a["answer"] for a in result["answers"]} <= set(ANSWERS) and len(scores) == 5
    assert scores == sorted(scores, reverse=True)
    drawn, attention = _decode(result["drawn"]), _decode(result["attention"])
    assert drawn.size[0] == 640  # the 50 px upload, drawn at a readable size
    assert attention.size[0] > 300 and np.asarray(attention.convert("L")).std() > 10
    assert result["boxes"] == [[0.0, 0.0, 50.0, 40.0], [0.0, 0.0, 25.0, 20.0]]  # the tiny detector's boxes


def test_expression_and_captions_modes_answer(client):
    http, _ = client
    expression = _ask(http, task="0:expression", text="the red ball").json()
    assert expression["box"] == expression["top"][0]["box"] and len(expression["top"]) == 3
    captions = _ask(http, task="0:captions", text="a red ball\n\ntwo dogs\n").json()
    assert sorted(c["caption"] for c in captions["captions"]) == ["a red ball", "two dogs"]


def test_example_uses_its_ground_truth_boxes(client, loaded):
    http, _ = client
    examples = loaded[1]
    example = sorted(examples.images)[0]
    result = _ask(http, image=False, example=example).json()
    assert result["image"] == f"example {example}"
    np.testing.assert_allclose(result["boxes"], examples.boxes[example], atol=0.01)


@pytest.mark.parametrize("case, status, message", [
    ("not-an-image", 400, "notes.png: not an image"),
    ("too-large", 413, "the upload is larger than the limit of 200000 bytes"),
    ("bomb", 400, "exceeds the limit of 40000000 (decompression bomb?)"),
    ("empty-text", 400, "the text is empty"),
    ("unknown-task", 404, "unknown task '3:question'; choose one of 0:question, 0:expression, 0:captions"),
    ("no-image", 400, "send an image file or choose an example"),
    ("image-and-example", 400, "not both or neither"),
    ("unknown-example", 404, "unknown example 'nope'"),
    ("missing-task", 422, "missing or malformed form field(s): task"),
    ("body-too-large", 413, "uploads are at most 200000 bytes"),
])
def test_bad_requests_get_a_4xx_and_one_clear_message(client, case, status, message):
    http, _ = client
    if case == "not-an-image":
        response = _ask(http, image=b"these are my notes", name="../../notes.png")
    elif case == "too-large":
        response = _ask(http, image=b"\x89PNG" + bytes(200_001))
    elif case == "bomb":  # 8000 x 6000 one-bit pixels: a few kB of PNG, 48 M pixels decoded
        response = _ask(http, image=_png((6000, 8000), mode="1"))
    elif case == "empty-text":
        response = _ask(http, text="   \n ")
    elif case == "unknown-task":
        response = _ask(http, task="3:question")
    elif case == "no-image":
        response = _ask(http, image=False)
    elif case == "image-and-example":
        response = _ask(http, example="1")
    elif case == "unknown-example":
        response = _ask(http, image=False, example="nope")
    elif case == "missing-task":
        response = http.post("/api/predict", data={"text": "what"}, files={"image": ("a.png", _png(), "image/png")})
    else:
        response = http.post("/api/predict", content=b"x" * 300_000,
                             headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"] and message in body["error"]
    assert "Traceback" not in response.text and "/tmp" not in body["error"] and "vilbert-serve-" not in body["error"]


def test_an_internal_failure_is_a_500_without_details(client, monkeypatch):
    http, demo = client
    monkeypatch.setattr(demo, "_run", lambda *args: (_ for _ in ()).throw(RuntimeError("secret internals")))
    response = _ask(http)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: the server log has the details"}


def test_uploads_live_only_in_a_temporary_directory_and_runs_hold_the_lock(client, monkeypatch, tmp_path):
    import tempfile

    import features.images

    http, demo = client
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    decode = features.images.read_image
    monkeypatch.setattr(features.images, "read_image", lambda path, **kw: seen.append(path) or decode(path, **kw))
    run = demo._run
    held = []
    monkeypatch.setattr(demo, "_run", lambda *args: held.append(demo.lock.locked()) or run(*args))
    threads = [threading.Thread(target=lambda: _ask(http)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert held == [True, True]
    assert len(seen) == 2 and all(p.parent.parent == tmp_path and p.parent.name.startswith("vilbert-serve-")
                                  for p in seen)
    assert list(tmp_path.iterdir()) == []  # removed after each request


def test_serve_binds_to_localhost_by_default():
    args = build_parser().parse_args(["serve", "--checkpoint", "ckpt"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)

