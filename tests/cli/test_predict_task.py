"""`vilbert predict-task`: one example of an NLVR2 / SNLI-VE / Visual7W checkpoint on new images, drawn."""

import json

import numpy as np
import pytest
from PIL import Image

from features.detectors import DETECTORS
from features.extract import extract
from features.inputs import ImageInput
from tasks.cli import main
from tasks.registry import TASKS
from tests.fixtures.tiny_12in1_data import write_nlvr2, write_snli_ve, write_visual7w
from tests.fixtures.tiny_checkpoints import TINY_FINETUNE
from tests.fixtures.tiny_detector import TinyDetector
from tests.fixtures.tiny_task_data import write_vocab


def _image(path, seed, hw=(80, 100)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def _tiny_detector_registered(monkeypatch):
    monkeypatch.setitem(DETECTORS, "tiny-test", "tests.fixtures.tiny_detector:build_tiny")


def _checkpoint(tmp, task, ids, data):
    (tmp / "images").mkdir(exist_ok=True)
    inputs = [ImageInput(i, str(_image(tmp / "images" / f"{i}.png", k))) for k, i in enumerate(ids)]
    extract(inputs, tmp / f"{task}.h5", TinyDetector(), workers=0, progress=False, float32=True)
    write_vocab(tmp / "tok")
    run = tmp / f"run-{task}"
    assert main(["finetune", "--task", task, *TINY_FINETUNE, "data.max_text_length=12", f"train.output_dir={run}",
                 f"data.tokenizer={tmp / 'tok'}", f"data.features=[{tmp / f'{task}.h5'}]", *data]) == 0
    return sorted((run / "checkpoints").iterdir())[-1]


def test_nlvr2_reads_the_statement_with_both_images_and_draws_them_side_by_side(tmp_path, capsys):
    ids = write_nlvr2(tmp_path / "nlvr2")
    checkpoint = _checkpoint(tmp_path, "nlvr2", ids, [f"data.root={tmp_path / 'nlvr2'}"])
    left, right = _image(tmp_path / "l.png", 1), _image(tmp_path / "r.png", 2, (60, 90))
    capsys.readouterr()
    assert main(["predict-task", "--task", "nlvr2", "--checkpoint", str(checkpoint), "--image", str(left),
                 "--image", str(right), "--text", "a white cat", "--random-detector", "--out",
                 str(tmp_path / "pair.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prediction"]["prediction"] == result["answers"][0]["answer"] in ("True", "False")
    assert [len(boxes) for boxes in result["boxes"]] == [2, 2]  # each image's own regions
    drawn = Image.open(tmp_path / "pair.png")
    # the pair at one height (100x80 and 90x60 -> 100 + 120 wide), scaled up to a readable 640 px, caption below
    assert drawn.size[0] == 640 and drawn.size[1] > round(80 * 640 / 228)
    assert main(["predict-task", "--task", "nlvr2", "--checkpoint", str(checkpoint), "--image", str(left),
                 "--text", "x", "--random-detector"]) == 2
    assert capsys.readouterr().err.strip().endswith("nlvr2 reads 2 image(s) (left image, right image), got 1")


def test_snli_ve_and_visual7w_one_example(tmp_path, capsys):
    ids = write_snli_ve(tmp_path / "snli")
    checkpoint = _checkpoint(tmp_path, "snli-ve", ids, [f"data.root={tmp_path / 'snli'}"])
    image = _image(tmp_path / "new.png", 5)
    capsys.readouterr()
    assert main(["predict-task", "--task", "snli-ve", "--checkpoint", str(checkpoint), "--image", str(image),
                 "--text", "a white cat", "--random-detector", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(a["answer"] for a in result["answers"]) == ["contradiction", "entailment", "neutral"]
    assert result["prediction"]["gold_label"] == result["answers"][0]["answer"]
    scores = [a["score"] for a in result["answers"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(scores) == pytest.approx(sorted(result["prediction"]["scores"]), abs=1e-5)
    for argv, message in [([], "snli-ve needs a hypothesis; the text is empty"),
                          (["--text", "a cat", "--option", "a"], "snli-ve takes no candidate texts; got 1")]:
        assert main(["predict-task", "--task", "snli-ve", "--checkpoint", str(checkpoint), "--image", str(image),
                     *argv, "--random-detector"]) == 2
        assert capsys.readouterr().err.strip().endswith(message)

    info = write_visual7w(tmp_path / "v7w")
    v7w = _checkpoint(tmp_path, "visual7w", info["image_ids"], [f"data.root={tmp_path / 'v7w'}",
                                                                "data.gt_features=[]"])
    boxes = [[0, 0, 50, 40], [50, 40, 100, 80], [10, 10, 30, 30]]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    capsys.readouterr()
    assert main(["predict-task", "--task", "visual7w", "--checkpoint", str(v7w), "--image", str(image), "--text",
                 "which is the cat?", "--boxes", str(tmp_path / "boxes.json"), "--box-format", "xyxy",
                 "--random-detector", "--out", str(tmp_path / "chosen.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prediction"]["answer"] in (1, 2, 3)  # the candidates are the given boxes, numbered as drawn
    assert result["box"] == result["prediction"]["box"] == boxes[result["prediction"]["answer"] - 1]
    assert result["answers"][0]["answer"].startswith(f"box {result['prediction']['answer']}: ")
    assert Image.open(tmp_path / "chosen.png").size[0] == 640  # a 100 px image drawn at a readable size


def test_task_choices_come_from_the_registry(monkeypatch, capsys):
    from tasks.cli import build_parser

    monkeypatch.setitem(TASKS, "made-up-task", "nowhere:Nothing")
    args = build_parser().parse_args(["predict-task", "--task", "made-up-task", "--checkpoint", "c", "--image", "i"])
    assert args.task == "made-up-task"
