"""`vilbert predict-task`: one example of an NLVR2 / SNLI-VE / Visual7W checkpoint on new images, drawn."""

import json

import numpy as np
import pytest
from PIL import Image

from features.detectors import DETECTORS
from features.extract import extract
from features.inputs import ImageInput
from tasks.cli import main
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


def test_nlvr2_draws_the_pair_side_by_side(tmp_path, capsys):
    ids = write_nlvr2(tmp_path / "nlvr2")
    checkpoint = _checkpoint(tmp_path, "nlvr2", ids, [f"data.root={tmp_path / 'nlvr2'}"])
    left, right = _image(tmp_path / "l.png", 1), _image(tmp_path / "r.png", 2, (60, 90))
    capsys.readouterr()
    assert main(["predict-task", "--task", "nlvr2", "--checkpoint", str(checkpoint), "--image", str(left),
                 "--image", str(right), "--text", "a white cat", "--random-detector", "--out",
                 str(tmp_path / "pair.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prediction"]["prediction"] in ("True", "False")
    assert Image.open(tmp_path / "pair.png").size == (190, 80)  # the two images side by side
    assert main(["predict-task", "--task", "nlvr2", "--checkpoint", str(checkpoint), "--image", str(left),
                 "--text", "x", "--random-detector"]) == 2  # one image for a two-image task: one line


def test_snli_ve_and_visual7w_one_example(tmp_path, capsys):
    ids = write_snli_ve(tmp_path / "snli")
    checkpoint = _checkpoint(tmp_path, "snli-ve", ids, [f"data.root={tmp_path / 'snli'}"])
    image = _image(tmp_path / "new.png", 5)
    capsys.readouterr()
    assert main(["predict-task", "--task", "snli-ve", "--checkpoint", str(checkpoint), "--image", str(image),
                 "--text", "a white cat", "--random-detector", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)["prediction"]
    assert prediction["gold_label"] in ("contradiction", "neutral", "entailment") and len(prediction["scores"]) == 3

    info = write_visual7w(tmp_path / "v7w")
    v7w = _checkpoint(tmp_path, "visual7w", info["image_ids"], [f"data.root={tmp_path / 'v7w'}",
                                                                "data.gt_features=[]"])
    (tmp_path / "boxes.json").write_text(json.dumps([[0, 0, 50, 40], [50, 40, 100, 80], [10, 10, 30, 30]]))
    capsys.readouterr()
    assert main(["predict-task", "--task", "visual7w", "--checkpoint", str(v7w), "--image", str(image), "--text",
                 "which is the cat?", "--boxes", str(tmp_path / "boxes.json"), "--box-format", "xyxy",
                 "--random-detector", "--out", str(tmp_path / "chosen.png"), "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)["prediction"]
    assert prediction["answer"] in (0, 1, 2)
    assert prediction["box"] == [[0, 0, 50, 40], [50, 40, 100, 80], [10, 10, 30, 30]][prediction["answer"]]
    assert (tmp_path / "chosen.png").is_file()
