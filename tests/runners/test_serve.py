"""`vilbert serve` over HTTP (Starlette's TestClient): every task of a multi-task checkpoint answers through the
predict path, and every refused request or start-up is one clear line."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from features.detectors import DETECTORS  # noqa: E402
from tasks.cli import build_parser, main  # noqa: E402
from tasks.engine.run_record import write_run_record  # noqa: E402
from tasks.errors import ConfigError  # noqa: E402
from tasks.runners.serve import Demo, create_app, load_examples  # noqa: E402
from tasks.runners.serving import load_all  # noqa: E402
from tasks.shapes.world import write_shapes_world  # noqa: E402
from tests.fixtures.tiny_checkpoints import save_checkpoint  # noqa: E402
from tests.fixtures.tiny_multitask import SERVED  # noqa: E402
from tests.fixtures.tiny_task_data import write_vocab  # noqa: E402

DETECTOR = "tiny-test-16"
# one request per task: what its page form sends (the first image is an example; NLVR2 takes a second)
REQUESTS = {
    "vqa": {"text": "what color is the circle"},
    "gqa": {"text": "what color is the circle"},
    "refcoco": {"text": "the red circle"},
    "visual7w": {"text": "which is the red circle?"},
    "snli-ve": {"text": "there is a red circle"},
    "retrieval": {"candidates": "a red circle\n\nthree blue squares\n"},
    "nlvr2": {"text": "the left image has more circles than the right image", "example2": "second"},
    "vcr-qa": {"text": "why is the circle red?", "candidates": "it is paint\nthe light\nit is a tomato\nno reason"},
}


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, DETECTOR, "tests.fixtures.tiny_multitask:build_wide_tiny_detector")


@pytest.fixture(scope="module")
def served(tiny_multitask_checkpoint, tmp_path_factory):
    """Every task of the tiny multi-task checkpoint, loaded once; a tiny shapes world for examples."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DETECTORS, DETECTOR, "tests.fixtures.tiny_multitask:build_wide_tiny_detector")
        tasks = load_all([str(tiny_multitask_checkpoint)], "cpu", DETECTOR, allow_random=True)
    world = tmp_path_factory.mktemp("serve") / "world"
    write_shapes_world(world, seed=3, num_images=20, progress=False)  # two test images
    return tasks, load_examples(world)


@pytest.fixture
def client(served):
    tasks, examples = served
    demo = Demo(tasks, "cpu", examples, max_upload_bytes=200_000)
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


def _examples(demo):
    return sorted(demo.examples.images, key=int)


def _ask(client, task, image=None, name="cat.png", **fields):
    files = {"image": (name, image if image is not None else _png(), "image/png")} if image is not False else None
    return client.post("/api/predict", data={"task": task, **fields}, files=files)


def test_the_page_lists_every_member_of_the_multi_task_checkpoint_with_its_inputs(client):
    http, _ = client
    page = http.get("/")
    assert page.status_code == 200 and 'id="form"' in page.text and "/api/predict" in page.text
    listed = http.get("/api/tasks").json()
    tasks = {t["name"]: t for t in listed["tasks"]}
    assert list(tasks) == list(SERVED)
    assert {t["checkpoint"] for t in tasks.values()} == {"run/step-00000008"}
    assert tasks["nlvr2"]["images"] == ["left image", "right image"] and tasks["vqa"]["images"] == ["image"]
    assert (tasks["retrieval"]["text"], tasks["retrieval"]["candidates"]) == (None, "captions")
    assert (tasks["vcr-qa"]["candidates"], tasks["vcr-qa"]["num_candidates"]) == ("answers", 4)
    assert tasks["snli-ve"]["text"] == "hypothesis" and tasks["refcoco"]["text"] == "expression"
    assert listed["examples"] and http.get(f"/api/examples/{listed['examples'][0]}").status_code == 200


@pytest.mark.parametrize("task", SERVED)
def test_each_task_answers_with_its_drawing_and_one_attention_figure_per_image(client, task):
    http, demo = client
    first, second = _examples(demo)[:2]
    fields = {k: (second if v == "second" else v) for k, v in REQUESTS[task].items()}
    response = _ask(http, task, image=False, example=first, **fields)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["task"] == task and result["summary"] and result["lines"]
    images = 2 if task == "nlvr2" else 1
    assert result["images"] == [f"example {first}", f"example {second}"][:images]
    assert _decode(result["drawn"]).size[0] >= 640 and len(result["attention"]) == images
    assert all(_decode(url).size[0] > 300 for url in result["attention"])
    boxes = np.asarray(demo.examples.boxes[first], dtype=np.float32)
    np.testing.assert_allclose(result["boxes"][0], boxes[: 4], atol=0.01)  # its ground-truth boxes (max_regions 5)
    if task == "retrieval":
        assert sorted(c["caption"] for c in result["captions"]) == ["a red circle", "three blue squares"]
    elif task == "refcoco":
        assert result["box"] == result["top"][0]["box"]
    else:
        scores = [a["score"] for a in result["answers"]]
        assert scores == sorted(scores, reverse=True)
        answers = {a["answer"] for a in result["answers"]}
        expected = {"nlvr2": {"True", "False"}, "snli-ve": {"contradiction", "neutral", "entailment"},
                    "vcr-qa": set(fields.get("candidates", "").splitlines())}
        assert answers <= expected.get(task, answers)
    if task == "visual7w":
        assert result["box"] in [[round(float(v), 2) for v in box] for box in boxes[:4]]


def test_the_page_and_predict_task_give_the_same_answer(client, tiny_multitask_checkpoint, tmp_path, capsys):
    http, demo = client
    example = _examples(demo)[0]
    served = _ask(http, "snli-ve", image=False, example=example, text="there is a red circle").json()
    (tmp_path / "boxes.json").write_text(json.dumps(demo.examples.boxes[example]))
    capsys.readouterr()
    assert main(["predict-task", "--task", "snli-ve", "--checkpoint", str(tiny_multitask_checkpoint), "--image",
                 str(demo.examples.images[example]), "--text", "there is a red circle", "--boxes",
                 str(tmp_path / "boxes.json"), "--box-format", "xyxy", "--detector", DETECTOR, "--random-detector",
                 "--json"]) == 0
    command_line = json.loads(capsys.readouterr().out)
    assert [a["answer"] for a in command_line["answers"]] == [a["answer"] for a in served["answers"]]
    assert [a["score"] for a in command_line["answers"]] == pytest.approx([a["score"] for a in served["answers"]])


def test_an_upload_is_drawn_at_a_readable_size_with_its_regions(client):
    http, _ = client
    result = _ask(http, "vqa", image=_png((40, 50)), text="what color is the ball").json()
    assert result["images"] == ["cat.png"]
    assert _decode(result["drawn"]).size[0] == 640  # a 50 px upload
    assert result["boxes"] == [[[0.0, 0.0, 50.0, 40.0], [0.0, 0.0, 25.0, 20.0]]]  # the tiny detector's own boxes


@pytest.mark.parametrize("case, status, message", [
    ("nlvr2-one-image", 400, "nlvr2 reads 2 image(s) (left image, right image), got 1"),
    ("vcr-three-answers", 400, "vcr-qa chooses among exactly 4 answers, got 3"),
    ("no-captions", 400, "retrieval needs captions to choose from; none given"),
    ("empty-text", 400, "vqa needs a question; the text is empty"),
    ("not-an-image", 400, "notes.png: not an image"),
    ("too-large", 413, "the upload is larger than the limit of 200000 bytes"),
    ("bomb", 400, "exceeds the limit of 40000000 (decompression bomb?)"),
    ("unknown-task", 404, "unknown task 'nope'; choose one of vqa, retrieval, refcoco"),
    ("no-image", 400, "vqa reads 1 image(s) (image), got 0"),
    ("image-and-example", 400, "image 1: send a file or choose an example, not both"),
    ("unknown-example", 404, "unknown example 'nope'"),
    ("missing-task", 422, "missing or malformed form field(s): task"),
    ("body-too-large", 413, "uploads are at most 200000 bytes"),
])
def test_bad_requests_get_a_4xx_and_one_clear_message(client, case, status, message):
    http, demo = client
    example = _examples(demo)[0]
    if case == "nlvr2-one-image":
        response = _ask(http, "nlvr2", image=False, example=example, text="the left one")
    elif case == "vcr-three-answers":
        response = _ask(http, "vcr-qa", image=False, example=example, text="why?", candidates="a\nb\nc")
    elif case == "no-captions":
        response = _ask(http, "retrieval", image=False, example=example, candidates=" \n")
    elif case == "empty-text":
        response = _ask(http, "vqa", text="   \n ")
    elif case == "not-an-image":
        response = _ask(http, "vqa", image=b"these are my notes", name="../../notes.png", text="what")
    elif case == "too-large":
        response = _ask(http, "vqa", image=b"\x89PNG" + bytes(200_001), text="what")
    elif case == "bomb":  # 8000 x 6000 one-bit pixels: a few kB of PNG, 48 M pixels decoded
        response = _ask(http, "vqa", image=_png((6000, 8000), mode="1"), text="what")
    elif case == "unknown-task":
        response = _ask(http, "nope", text="what")
    elif case == "no-image":
        response = _ask(http, "vqa", image=False, text="what")
    elif case == "image-and-example":
        response = _ask(http, "vqa", example=example, text="what")
    elif case == "unknown-example":
        response = _ask(http, "vqa", image=False, example="nope", text="what")
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
    import tasks.runners.serve

    http, _ = client
    monkeypatch.setattr(tasks.runners.serve, "answer", lambda *args: (_ for _ in ()).throw(RuntimeError("secret")))
    response = _ask(http, "vqa", text="what")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: the server log has the details"}


def test_uploads_live_only_in_a_temporary_directory_and_runs_hold_the_lock(client, monkeypatch, tmp_path):
    import tempfile

    import tasks.runners.serve

    http, demo = client
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    decode = tasks.runners.serve.read_image
    monkeypatch.setattr(tasks.runners.serve, "read_image", lambda path, **kw: seen.append(path) or decode(path, **kw))
    run = tasks.runners.serve.answer
    held = []
    monkeypatch.setattr(tasks.runners.serve, "answer", lambda *args: held.append(demo.lock.locked()) or run(*args))
    threads = [threading.Thread(target=lambda: _ask(http, "vqa", text="what color")) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert held == [True, True]
    assert len(seen) == 2 and all(p.parent.parent == tmp_path and p.parent.name.startswith("vilbert-serve-")
                                  for p in seen)
    assert list(tmp_path.iterdir()) == []  # removed after each request


# ------------------------------------------------------------------------------------------------- start-up


def _recorded(directory, task, answers=None, drop=()):
    """A tiny task checkpoint whose run record names `task`, without the weights of the modules in `drop`."""
    save_checkpoint(directory, answers=answers, v_feature_size=16)
    write_vocab(directory)
    if task:
        write_run_record(directory, {"task": task, "task_token": None, "feature_extractor": [],
                                     "architecture": "tasks"})
    weights = load_file(str(directory / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k.split(".")[0] not in drop}, str(directory / "model.safetensors"))
    return directory


def test_a_checkpoint_that_does_not_say_offers_every_task_whose_heads_it_holds(tmp_path):
    from tasks.registry import task_class

    tasks = load_all([str(_recorded(tmp_path / "c", None, answers=["red", "blue"]))], "cpu", DETECTOR,
                     allow_random=True)
    names = [t.name for t in tasks]
    assert {"vqa", "retrieval", "refcoco"} <= set(names) and "pretrain" not in names
    assert all(task_class(name).head_modules for name in names)


@pytest.mark.parametrize("case, message", [
    ("same-task-twice", "/b: offers vqa, which --checkpoint {tmp}/a offers too; serve one of them"),
    ("no-answer-list", "no task to serve (vqa: config.json has no VQA answer list (id2label))"),
    ("head-missing", "model.safetensors has no answer_head weights (needed by vqa)"),
    ("no-head-at-all", "no task to serve (its run record names no task and its weights hold no task's head)"),
])
def test_a_checkpoint_that_cannot_be_served_is_one_line_at_start(tmp_path, capsys, case, message):
    heads = ("answer_head", "gqa_answer_head", "pair_head", "region_score_head", "binary_head", "tri_head")
    if case == "same-task-twice":
        directories = [_recorded(tmp_path / "a", "vqa", ["red"]), _recorded(tmp_path / "b", "vqa", ["red"])]
    elif case == "no-answer-list":
        directories = [_recorded(tmp_path / "a", "vqa")]
    elif case == "head-missing":
        directories = [_recorded(tmp_path / "a", "vqa", ["red"], drop=("answer_head",))]
    else:
        directories = [_recorded(tmp_path / "a", None, ["red"], drop=heads)]
    message = message.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_all([str(d) for d in directories], "cpu", DETECTOR, allow_random=True)
    argv = ["serve", *(a for d in directories for a in ("--checkpoint", str(d))), "--detector", DETECTOR,
            "--random-detector", "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_serve_binds_to_localhost_by_default():
    args = build_parser().parse_args(["serve", "--checkpoint", "ckpt"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
